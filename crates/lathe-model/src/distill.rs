//! Knowledge distillation after Hinton et al. (2015): a small student MLP learns from a
//! trained teacher's softened outputs as well as from the labels, with the loss
//! `α · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − α) · CE(student, labels)`.
//!
//! Besides the plain recipe, the student can be shown extra *teacher-labelled* inputs
//! ([`Augment`]): mixtures of two training rows (mixup) or noisy copies of one. They carry no
//! label, only the teacher's soft targets, so they enter the soft term alone. On small data
//! sets such as digits the plain recipe mostly re-teaches what the labels already say; the
//! extra rows show the student how the teacher behaves *between* the training points, which
//! is where distillation has something to add (measured by `lathe-distill-bench`).
//!
//! [`auto_distill`] chooses the student's width: it tries one-hidden-layer students from
//! small to large and keeps the first whose validation accuracy stays within the accuracy
//! budget of the teacher's.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::artifact::{Architecture, Artifact, DriftReference};
use crate::data::Splits;
use crate::engine::Engine;
use crate::eval::{Evaluation, evaluate};
use crate::mlp::{DeviceError, Mlp, MlpConfig, MlpError, try_device};
use crate::train::{
    BestEpoch, EpochMetrics, INIT_STREAM, SHUFFLE_STREAM, TrainConfig, TrainError, check_splits,
    feature_tensor, label_tensor, reference_sample, score_validation,
};

/// Draws the augmented rows from a stream of its own, so switching augmentation on does not
/// change the student's initialisation or the order of the real rows.
const AUGMENT_STREAM: u64 = 0x1a7e_0004;

/// The widths [`auto_distill`] tries, smallest first.
pub const AUTO_WIDTHS: &[usize] = &[8, 16, 32, 64, 128, 256];

/// The soft-target term: `T² · KL(softmax(teacher/T) ‖ softmax(student/T))`, summed over
/// classes and averaged over rows (PyTorch's `batchmean`). Returns a one-element tensor.
///
/// The teacher's logits are detached: no gradient flows into the teacher. The `T²` factor
/// keeps the soft term's gradients at the scale of the hard term's as `T` grows (Hinton et
/// al. §2), so `α` means the same thing at every temperature.
pub fn soft_target_loss(
    student_logits: Tensor<2>,
    teacher_logits: Tensor<2>,
    temperature: f64,
) -> Tensor<1> {
    let t = temperature as f32;
    let [rows, _] = student_logits.dims();
    let log_student = log_softmax(student_logits.div_scalar(t), 1); // [rows, classes]
    let log_teacher = log_softmax(teacher_logits.detach().div_scalar(t), 1); // [rows, classes]
    let teacher = log_teacher.clone().exp();
    (teacher * (log_teacher - log_student))
        .sum()
        .mul_scalar(t * t / rows.max(1) as f32)
}

/// The whole distillation loss:
/// `α · T² · KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − α) · CE(student, labels)`,
/// both terms averaged over the rows. Returns a one-element tensor.
pub fn distillation_loss(
    student_logits: Tensor<2>,
    teacher_logits: Tensor<2>,
    labels: Tensor<1, Int>,
    temperature: f64,
    alpha: f64,
) -> Tensor<1> {
    let device = student_logits.device();
    let hard = CrossEntropyLossConfig::new()
        .init(&device)
        .forward(student_logits.clone(), labels);
    let soft = soft_target_loss(student_logits, teacher_logits, temperature);
    soft.mul_scalar(alpha as f32) + hard.mul_scalar((1.0 - alpha) as f32)
}

/// Extra unlabelled inputs, labelled by the teacher, shown to the student each epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Augment {
    /// Only the training rows.
    None,
    /// `copies` mixtures per training row: `λ·a + (1 − λ)·b` of two random training rows
    /// (standardised), `λ ~ U(0, 1)`.
    Mixup { copies: usize },
    /// `copies` noisy versions per training row: the standardised row plus `N(0, std²)`
    /// noise on every feature.
    Noise { copies: usize, std: f32 },
}

impl Augment {
    /// Augmented rows per training row.
    fn copies(&self) -> usize {
        match *self {
            Augment::None => 0,
            Augment::Mixup { copies } | Augment::Noise { copies, .. } => copies,
        }
    }
}

/// How to distil. Checked by [`DistillConfig::validate`] before any work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Softening temperature `T` (> 0).
    pub temperature: f64,
    /// Weight `α` of the soft-target term, in [0, 1]; `1 − α` weighs the labels.
    pub alpha: f64,
    /// Passes over the training split; the epoch with the best validation accuracy is kept.
    pub epochs: usize,
    /// Real rows per optimiser step (augmented rows come on top).
    pub batch_size: usize,
    /// Adam's step size.
    pub learning_rate: f64,
    /// Seeds the student's initialisation, shuffling and augmentation.
    pub seed: u64,
    /// Teacher-labelled extra inputs.
    pub augment: Augment,
}

impl Default for DistillConfig {
    /// Hinton's recipe at the peer's settings (T = 4, α = 0.7, Adam 1e-3, batch 64) with
    /// one mixup row per training row, over 300 epochs. On the digits validation splits
    /// (`lathe-distill-bench`, 5 seeds) mixup at 300 epochs was the best or within one
    /// validation row of the best for both students, and the plain recipe at 60 epochs was
    /// worse than training from scratch, as the peer found.
    fn default() -> Self {
        DistillConfig {
            temperature: 4.0,
            alpha: 0.7,
            epochs: 300,
            batch_size: 64,
            learning_rate: 1e-3,
            seed: 0,
            augment: Augment::Mixup { copies: 1 },
        }
    }
}

impl DistillConfig {
    /// Checks each field, naming the first bad one.
    pub fn validate(&self) -> Result<(), DistillError> {
        let bad = |field: &'static str, reason: String| {
            Err(DistillError::InvalidConfig { field, reason })
        };
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(
                "temperature",
                format!("must be a finite number > 0, got {}", self.temperature),
            );
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return bad("alpha", format!("must be in [0, 1], got {}", self.alpha));
        }
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1, got 0".into());
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
        match self.augment {
            Augment::Mixup { copies } | Augment::Noise { copies, .. } if copies > 16 => {
                return bad(
                    "augment.copies",
                    format!("must be at most 16, got {copies}"),
                );
            }
            Augment::Noise { std, .. } if !(std.is_finite() && std >= 0.0) => {
                return bad(
                    "augment.std",
                    format!("must be a finite number >= 0, got {std}"),
                );
            }
            _ => {}
        }
        Ok(())
    }
}

/// Why distillation could not run.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum DistillError {
    /// A distillation setting is out of range.
    #[error("distill.{field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// The teacher artifact cannot teach on this data.
    #[error("teacher: {0}")]
    Teacher(String),
    /// The student's shape or the data is wrong (the same checks as training).
    #[error(transparent)]
    Train(#[from] TrainError),
    /// The student's shape is invalid.
    #[error("student: {0}")]
    Model(#[from] MlpError),
    /// The compute device could not be chosen.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The student could not be packaged (a bug if it ever happens).
    #[error("the student could not be packaged: {0}")]
    Package(String),
}

/// The result of [`distill_mlp`].
#[derive(Debug, Clone, PartialEq)]
pub struct DistillOutcome {
    /// The student with the best validation score, with the teacher's preprocessing, class
    /// labels and lineage plus a `distill` entry.
    pub artifact: Artifact,
    /// One entry per epoch; `train_loss` is the distillation loss.
    pub epochs: Vec<EpochMetrics>,
    /// The epoch whose weights are in the artifact (1-based).
    pub best_epoch: usize,
    /// The student on the test split.
    pub test: Evaluation,
    /// The student on the validation split.
    pub validation: Evaluation,
    /// The teacher on the same validation split, the reference for the accuracy budget.
    pub teacher_validation_accuracy: f64,
    /// The teacher on the same test split.
    pub teacher_test_accuracy: f64,
    /// Wall time of the epochs.
    pub train_seconds: f64,
}

/// One width [`auto_distill`] tried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WidthTrial {
    /// The student's hidden width.
    pub width: usize,
    /// Its parameter count.
    pub parameters: usize,
    /// Its best validation accuracy.
    pub validation_accuracy: f64,
    /// Whether that accuracy is within the budget of the teacher's.
    pub within_budget: bool,
}

/// The result of [`auto_distill`].
#[derive(Debug, Clone, PartialEq)]
pub struct AutoOutcome {
    /// The chosen student: the first width inside the budget, or the most accurate one
    /// tried when none is.
    pub chosen: DistillOutcome,
    /// Every width tried, in order.
    pub tried: Vec<WidthTrial>,
    /// Whether the chosen student is inside the budget.
    pub within_budget: bool,
}

/// The teacher's network and preprocessing, checked against the splits.
fn load_teacher(
    teacher: &Artifact,
    splits: &Splits,
    device: &Device,
) -> Result<(Mlp, Engine), DistillError> {
    teacher
        .validate()
        .map_err(|e| DistillError::Teacher(e.to_string()))?;
    let config = teacher.mlp_config();
    let train = &splits.train;
    if config.input != train.n_features {
        return Err(DistillError::Teacher(format!(
            "takes {} features but the data has {}",
            config.input, train.n_features
        )));
    }
    if teacher.class_labels != train.class_labels {
        return Err(DistillError::Teacher(format!(
            "was trained for classes {:?} but the data has {:?}",
            teacher.class_labels, train.class_labels
        )));
    }
    let network = Mlp::from_layers(config, &teacher.layers, device)
        .map_err(|e| DistillError::Teacher(e.to_string()))?;
    let engine =
        Engine::from_artifact(teacher).map_err(|e| DistillError::Teacher(e.to_string()))?;
    Ok((network, engine))
}

/// Fills `out` with `rows × copies` augmented rows drawn from the standardised `rows`.
fn augment_rows(
    augment: Augment,
    features: &[f32],
    n_rows: usize,
    n_features: usize,
    rng: &mut StdRng,
    out: &mut Vec<f32>,
) {
    out.clear();
    let row = |i: usize| &features[i * n_features..(i + 1) * n_features];
    match augment {
        Augment::None => {}
        Augment::Mixup { copies } => {
            for _ in 0..n_rows * copies {
                let a = row(rng.random_range(0..n_rows));
                let b = row(rng.random_range(0..n_rows));
                let lambda: f32 = rng.random();
                out.extend(
                    a.iter()
                        .zip(b)
                        .map(|(x, y)| lambda * x + (1.0 - lambda) * y),
                );
            }
        }
        Augment::Noise { copies, std } => {
            for _ in 0..n_rows * copies {
                let a = row(rng.random_range(0..n_rows));
                out.extend(a.iter().map(|x| x + std * standard_normal(rng)));
            }
        }
    }
}

/// One draw from N(0, 1) (Box–Muller), so the noise comes from the seeded generator.
fn standard_normal(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Distils `teacher` into a student shaped `student` on `splits` (the same splits the
/// teacher was trained on), keeps the epoch with the best validation accuracy (ties go to
/// the lower validation cross-entropy), and evaluates it. `on_epoch` is called after every
/// epoch.
pub fn distill_mlp(
    splits: &Splits,
    teacher: &Artifact,
    student: &MlpConfig,
    cfg: &DistillConfig,
    on_epoch: &mut dyn FnMut(&EpochMetrics),
) -> Result<DistillOutcome, DistillError> {
    cfg.validate()?;
    student.validate()?;
    let train_like = TrainConfig {
        epochs: cfg.epochs,
        batch_size: cfg.batch_size,
        learning_rate: cfg.learning_rate,
        weight_decay: 0.0,
        seed: cfg.seed,
        patience: None,
    };
    check_splits(splits, student, &train_like)?;

    let base_device = try_device()?;
    let device = base_device.clone().autodiff();
    let (teacher_net, teacher_engine) = load_teacher(teacher, splits, &base_device)?;
    // The student reads inputs exactly as the teacher does: the same standardiser, which
    // was fitted on this same training split.
    let standardizer = teacher.preprocessing.clone();
    let train = &splits.train;
    let n_train = train.rows();
    let n_features = train.n_features;
    let train_std = standardizer.transform(train);
    let x_train = feature_tensor(train, &standardizer, &device);
    let y_train = label_tensor(train, &device);
    // The teacher is fixed, so its logits for the real rows are computed once, without
    // gradients (on the plain device), and gathered per epoch with the rows.
    let t_train = teacher_net.forward(feature_tensor(train, &standardizer, &base_device));
    let has_validation = splits.validation.rows() > 0;
    let x_validation = feature_tensor(&splits.validation, &standardizer, &base_device);
    let y_validation = label_tensor(&splits.validation, &base_device);

    let mut network: Mlp = student.init_seeded(cfg.seed ^ INIT_STREAM, &device);
    let mut optimizer = AdamConfig::new().with_epsilon(1e-8).init();
    let validation_loss_fn = CrossEntropyLossConfig::new().init(&base_device);
    let mut shuffle_rng = StdRng::seed_from_u64(cfg.seed ^ SHUFFLE_STREAM);
    let mut augment_rng = StdRng::seed_from_u64(cfg.seed ^ AUGMENT_STREAM);
    let mut order: Vec<i64> = (0..n_train as i64).collect();
    let copies = cfg.augment.copies();
    let mut augmented = Vec::new();

    let mut history = Vec::with_capacity(cfg.epochs);
    let mut best: Option<BestEpoch> = None;
    let started = Instant::now();
    for epoch in 1..=cfg.epochs {
        let epoch_started = Instant::now();
        order.shuffle(&mut shuffle_rng);
        let index_base =
            Tensor::<1, Int>::from_data(TensorData::new(order.clone(), [n_train]), &base_device);
        let index = Tensor::<1, Int>::from_data(TensorData::new(order.clone(), [n_train]), &device);
        let x_epoch = x_train.clone().select(0, index.clone());
        let y_epoch = y_train.clone().select(0, index);
        let t_epoch = t_train.clone().select(0, index_base);
        // The epoch's augmented rows and their teacher logits, in one forward pass.
        let augmented_epoch = if copies > 0 {
            augment_rows(
                cfg.augment,
                &train_std,
                n_train,
                n_features,
                &mut augment_rng,
                &mut augmented,
            );
            let rows = Tensor::<2>::from_data(
                TensorData::new(augmented.clone(), [n_train * copies, n_features]),
                &base_device,
            );
            let logits = teacher_net.forward(rows.clone());
            Some((Tensor::<2>::from_inner(rows), logits))
        } else {
            None
        };

        let mut loss_sum = Tensor::<1>::zeros([1], &base_device);
        let mut correct = Tensor::<1, Int>::zeros([1], &base_device);
        for start in (0..n_train).step_by(cfg.batch_size) {
            let end = (start + cfg.batch_size).min(n_train);
            let rows = end - start;
            let mut x = x_epoch.clone().slice(start..end); // [rows, input]
            let y = y_epoch.clone().slice(start..end); // [rows]
            let mut t = t_epoch.clone().slice(start..end); // [rows, classes]
            if let Some((x_aug, t_aug)) = &augmented_epoch {
                let range = start * copies..end * copies;
                x = Tensor::cat(vec![x, x_aug.clone().slice(range.clone())], 0);
                t = Tensor::cat(vec![t, t_aug.clone().slice(range)], 0);
            }
            let logits = network.forward(x); // [rows (+ augmented), classes]
            let real = logits.clone().slice(0..rows);
            // The labels weigh only the real rows; the soft term covers every row, since
            // the teacher labels the augmented ones.
            let hard = CrossEntropyLossConfig::new()
                .init(&device)
                .forward(real.clone(), y.clone());
            let soft = soft_target_loss(logits, Tensor::<2>::from_inner(t), cfg.temperature);
            let loss =
                soft.mul_scalar(cfg.alpha as f32) + hard.mul_scalar((1.0 - cfg.alpha) as f32);
            loss_sum = loss_sum + loss.clone().inner() * (rows as f32);
            let predicted = real.inner().argmax(1).reshape([rows]);
            correct = correct + predicted.equal(y.inner()).int().sum();
            let gradients = GradientsParams::from_grads(loss.backward(), &network);
            network = optimizer.step(cfg.learning_rate, network, gradients);
        }

        let (validation_accuracy, validation_loss) = if has_validation {
            score_validation(
                network.valid().forward(x_validation.clone()),
                y_validation.clone(),
                &validation_loss_fn,
            )
        } else {
            (0.0, 0.0)
        };
        let metrics = EpochMetrics::from_sums(
            epoch,
            loss_sum,
            correct,
            n_train,
            validation_accuracy,
            epoch_started,
        );
        on_epoch(&metrics);
        history.push(metrics);
        if BestEpoch::improved_on(&best, has_validation, validation_accuracy, validation_loss) {
            best = Some(BestEpoch::new(
                validation_accuracy,
                validation_loss,
                epoch,
                network.valid().to_layers(),
            ));
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let Some(BestEpoch {
        epoch: best_epoch,
        layers,
        ..
    }) = best
    else {
        return Err(DistillError::Package("no epoch ran".into()));
    };

    let mut artifact = Artifact {
        architecture: Architecture::Mlp(student.clone()),
        layers,
        preprocessing: standardizer,
        feature_names: teacher.feature_names.clone(),
        class_labels: teacher.class_labels.clone(),
        lineage: teacher.lineage.clone(),
        reference: DriftReference::default(),
        metrics: BTreeMap::new(),
    };
    let engine =
        Engine::from_artifact(&artifact).map_err(|e| DistillError::Package(e.to_string()))?;
    artifact.reference = reference_sample(&engine, train)?;
    let test = evaluate(&engine, &splits.test);
    let validation = evaluate(&engine, &splits.validation);
    let teacher_test_accuracy = evaluate(&teacher_engine, &splits.test).accuracy;
    let teacher_validation_accuracy = evaluate(&teacher_engine, &splits.validation).accuracy;

    let best_metrics = &history[best_epoch - 1];
    let metrics = BTreeMap::from([
        ("test_accuracy".to_string(), test.accuracy),
        ("validation_accuracy".to_string(), validation.accuracy),
        ("train_accuracy".to_string(), best_metrics.train_accuracy),
        ("train_loss".to_string(), best_metrics.train_loss),
        ("best_epoch".to_string(), best_epoch as f64),
        ("epochs_run".to_string(), history.len() as f64),
        ("train_seconds".to_string(), train_seconds),
        ("param_count".to_string(), student.param_count() as f64),
        ("teacher_test_accuracy".to_string(), teacher_test_accuracy),
        (
            "teacher_validation_accuracy".to_string(),
            teacher_validation_accuracy,
        ),
        ("temperature".to_string(), cfg.temperature),
        ("alpha".to_string(), cfg.alpha),
    ]);
    let params = serde_json::json!({
        "teacher": {
            "model": teacher.mlp_config(),
            "parameters": teacher.param_count(),
            "metrics": teacher.metrics,
        },
        "student": student,
        "distill": cfg,
    });
    artifact.push_lineage("distill", params, metrics.clone());
    artifact.metrics = metrics;

    Ok(DistillOutcome {
        artifact,
        epochs: history,
        best_epoch,
        test,
        validation,
        teacher_validation_accuracy,
        teacher_test_accuracy,
        train_seconds,
    })
}

/// Distils into one-hidden-layer students of [`AUTO_WIDTHS`], smallest first, and stops at
/// the first whose validation accuracy is at least the teacher's minus `max_accuracy_drop`
/// (a fraction). When no width qualifies, the most accurate one is returned with
/// `within_budget: false`. Validation, not test, accuracy decides, so the test split stays
/// unseen by the choice.
pub fn auto_distill(
    splits: &Splits,
    teacher: &Artifact,
    cfg: &DistillConfig,
    max_accuracy_drop: f64,
    on_epoch: &mut dyn FnMut(usize, &EpochMetrics),
) -> Result<AutoOutcome, DistillError> {
    if !(0.0..=1.0).contains(&max_accuracy_drop) {
        return Err(DistillError::InvalidConfig {
            field: "max_accuracy_drop",
            reason: format!("must be a fraction in [0, 1], got {max_accuracy_drop}"),
        });
    }
    let config = teacher.mlp_config();
    let mut tried = Vec::new();
    let mut best: Option<DistillOutcome> = None;
    for &width in AUTO_WIDTHS {
        let student = MlpConfig::new(config.input, vec![width], config.classes);
        let outcome = distill_mlp(splits, teacher, &student, cfg, &mut |m| on_epoch(width, m))?;
        let accuracy = outcome.validation.accuracy;
        // A small tolerance so that "exactly on the budget" is not lost to rounding.
        let within = accuracy + 1e-9 >= outcome.teacher_validation_accuracy - max_accuracy_drop;
        tried.push(WidthTrial {
            width,
            parameters: student.param_count(),
            validation_accuracy: accuracy,
            within_budget: within,
        });
        if within {
            return Ok(AutoOutcome {
                chosen: outcome,
                tried,
                within_budget: true,
            });
        }
        if best
            .as_ref()
            .is_none_or(|b| accuracy > b.validation.accuracy)
        {
            best = Some(outcome);
        }
    }
    match best {
        Some(chosen) => Ok(AutoOutcome {
            chosen,
            tried,
            within_budget: false,
        }),
        None => Err(DistillError::Package("no width was tried".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(rows: &[&[f32]]) -> Tensor<2> {
        let cols = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::<2>::from_data(TensorData::new(flat, [rows.len(), cols]), &Device::flex())
    }

    fn labels(values: &[i64]) -> Tensor<1, Int> {
        Tensor::<1, Int>::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &Device::flex(),
        )
    }

    fn scalar(t: Tensor<1>) -> f64 {
        f64::from(t.into_scalar::<f32>())
    }

    /// Teacher `[ln 3, 0]` against a uniform student over two classes.
    fn one_row() -> (Tensor<2>, Tensor<2>) {
        (logits(&[&[0.0, 0.0]]), logits(&[&[3f32.ln(), 0.0]]))
    }

    #[test]
    fn soft_term_at_t1_is_the_kl_divergence() {
        let (student, teacher) = one_row();
        // p_t = (3/4, 1/4), p_s = (1/2, 1/2): KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812.
        let got = scalar(soft_target_loss(student, teacher, 1.0));
        assert!((got - 0.130_812).abs() < 1e-5, "{got}");
    }

    #[test]
    fn soft_term_at_t2_carries_the_t_squared_factor() {
        let (student, teacher) = one_row();
        // teacher/2 = (ln 3 / 2, 0): p_t = (√3, 1)/(√3 + 1) = (0.633975, 0.366025);
        // KL = 0.633975 ln(1.267949) + 0.366025 ln(0.732051) = 0.036341; × T² = 0.145363.
        let got = scalar(soft_target_loss(student, teacher, 2.0));
        assert!((got - 0.145_363).abs() < 1e-5, "{got}");
    }

    #[test]
    fn soft_term_is_zero_when_student_matches_teacher_and_averages_rows() {
        let same = logits(&[&[1.0, -2.0, 0.5]]);
        let got = scalar(soft_target_loss(same.clone(), same, 4.0));
        assert!(got.abs() < 1e-6, "{got}");
        // Two rows: one matching (KL 0), one the T = 1 case above (0.130812): mean 0.065406.
        let student = logits(&[&[0.0, 0.0], &[0.0, 0.0]]);
        let teacher = logits(&[&[0.0, 0.0], &[3f32.ln(), 0.0]]);
        let got = scalar(soft_target_loss(student, teacher, 1.0));
        assert!((got - 0.065_406).abs() < 1e-5, "{got}");
    }

    #[test]
    fn alpha_zero_is_plain_cross_entropy() {
        let (student, teacher) = one_row();
        // CE of a uniform two-class prediction is ln 2, whatever the teacher says.
        let got = scalar(distillation_loss(student, teacher, labels(&[0]), 4.0, 0.0));
        assert!((got - std::f64::consts::LN_2).abs() < 1e-5, "{got}");
    }

    #[test]
    fn alpha_one_is_the_soft_term_alone() {
        let (student, teacher) = one_row();
        let got = scalar(distillation_loss(student, teacher, labels(&[1]), 2.0, 1.0));
        assert!((got - 0.145_363).abs() < 1e-5, "{got}");
    }

    #[test]
    fn mixed_alpha_weighs_both_terms() {
        let (student, teacher) = one_row();
        // 0.7 · 0.145363 + 0.3 · ln 2 = 0.309698.
        let got = scalar(distillation_loss(student, teacher, labels(&[0]), 2.0, 0.7));
        assert!((got - 0.309_698).abs() < 1e-5, "{got}");
    }

    /// A small teacher on the digits split of seed 3.
    fn digits_teacher() -> (Splits, Artifact) {
        let (train, test) = crate::data::builtin("digits").unwrap();
        let splits = crate::data::split(train, Some(test), 0.1, 0.0, 3).unwrap();
        let cfg = TrainConfig {
            epochs: 10,
            seed: 3,
            patience: None,
            ..TrainConfig::default()
        };
        let teacher = crate::train::train_mlp(
            &splits,
            &MlpConfig::new(64, vec![64], 10),
            &cfg,
            &mut |_| {},
        )
        .unwrap();
        (splits, teacher.artifact)
    }

    #[test]
    fn a_distilled_student_keeps_the_teachers_preprocessing_and_lineage() {
        let (splits, teacher) = digits_teacher();
        let student = MlpConfig::new(64, vec![16], 10);
        let cfg = DistillConfig {
            epochs: 6,
            seed: 3,
            ..DistillConfig::default()
        };
        let mut seen = 0;
        let out = distill_mlp(&splits, &teacher, &student, &cfg, &mut |_| seen += 1).unwrap();
        assert_eq!(seen, 6);
        assert_eq!(out.epochs.len(), 6);
        let a = &out.artifact;
        a.validate().unwrap();
        assert_eq!(a.mlp_config(), &student);
        assert_eq!(a.preprocessing, teacher.preprocessing);
        assert_eq!(a.class_labels, teacher.class_labels);
        let stages: Vec<&str> = a.lineage.iter().map(|l| l.stage.as_str()).collect();
        assert_eq!(stages, ["train", "distill"]);
        let entry = &a.lineage[1];
        assert_eq!(entry.metrics["temperature"], 4.0);
        assert_eq!(entry.metrics["alpha"], 0.7);
        assert_eq!(entry.params["student"]["hidden"][0], 16);
        // Six epochs are far from converged; this only rules out a broken student.
        assert!(out.test.accuracy > 0.7, "{}", out.test.accuracy);
        // The recorded accuracy is the stored model's.
        let engine = Engine::from_artifact(a).unwrap();
        assert_eq!(
            evaluate(&engine, &splits.test).accuracy,
            a.metrics["test_accuracy"]
        );
    }

    #[test]
    fn auto_mode_stops_at_the_first_width_inside_the_budget() {
        let (splits, teacher) = digits_teacher();
        let cfg = DistillConfig {
            epochs: 3,
            seed: 3,
            augment: Augment::None,
            ..DistillConfig::default()
        };
        // Every student is within a budget of 100 points: the smallest is taken.
        let out = auto_distill(&splits, &teacher, &cfg, 1.0, &mut |_, _| {}).unwrap();
        assert!(out.within_budget);
        assert_eq!(out.tried.len(), 1);
        assert_eq!(
            out.chosen.artifact.mlp_config().hidden,
            vec![AUTO_WIDTHS[0]]
        );
        // With a zero budget the search may go on to larger widths; every width it tries is
        // recorded, smallest first.
        let out = auto_distill(&splits, &teacher, &cfg, 0.0, &mut |_, _| {}).unwrap();
        let widths: Vec<usize> = out.tried.iter().map(|t| t.width).collect();
        assert_eq!(widths, AUTO_WIDTHS[..widths.len()]);
        assert_eq!(out.within_budget, out.tried.last().unwrap().within_budget);
        let err = auto_distill(&splits, &teacher, &cfg, 1.5, &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("max_accuracy_drop"), "{err}");
    }

    #[test]
    fn a_teacher_for_other_classes_is_refused() {
        let (splits, mut teacher) = digits_teacher();
        teacher.class_labels.reverse();
        let student = MlpConfig::new(64, vec![8], 10);
        let err = distill_mlp(
            &splits,
            &teacher,
            &student,
            &DistillConfig::default(),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, DistillError::Teacher(_)), "{err}");
    }

    #[test]
    fn config_errors_name_the_field() {
        let cfg = DistillConfig {
            temperature: 0.0,
            ..DistillConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("distill.temperature"), "{err}");
        let cfg = DistillConfig {
            alpha: 1.5,
            ..DistillConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("distill.alpha"), "{err}");
    }
}
