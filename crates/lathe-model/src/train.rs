//! Training an MLP with burn: standardisation fitted on the training split, seeded
//! initialisation and shuffling, mini-batch Adam, early stopping on validation accuracy, and
//! the finished [`Artifact`] with its test and validation evaluations.
//!
//! The whole standardised training set is uploaded to the device once; each epoch gathers
//! it in shuffled order with one `select` and slices batches from that. Loss and accuracy
//! are accumulated on the device and read once per epoch, because reading a value forces
//! the device to finish all queued work.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::artifact::{Architecture, Artifact, DriftReference, LayerTensors};
use crate::data::{Dataset, Splits, Standardizer};
use crate::engine::Engine;
use crate::eval::{Evaluation, evaluate};
use crate::mlp::{DeviceError, Mlp, MlpConfig, MlpError, try_device};

/// Seed offsets, so initialisation and shuffling draw from independent streams of the one
/// user seed (0x1a7e_0003 drew the version-1 reference sample).
pub(crate) const INIT_STREAM: u64 = 0x1a7e_0001;
pub(crate) const SHUFFLE_STREAM: u64 = 0x1a7e_0002;

/// How to train. Every field is checked by [`TrainConfig::validate`] before any work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Passes over the training split (at most; early stopping may end sooner).
    pub epochs: usize,
    /// Rows per optimiser step; the last batch of an epoch may be smaller.
    pub batch_size: usize,
    /// Adam's step size.
    pub learning_rate: f64,
    /// Adam's L2 penalty added to the gradients (PyTorch `Adam(weight_decay=…)`); 0 is off.
    pub weight_decay: f64,
    /// Seeds initialisation, shuffling and the reference sample: the same seed, data and
    /// build give the same model.
    pub seed: u64,
    /// Stop after this many epochs without a better validation score; `None` trains every
    /// epoch. Either way the weights of the best validation epoch are kept.
    pub patience: Option<usize>,
}

impl Default for TrainConfig {
    /// The PyTorch peer's recipe (Adam 1e-3, batch 64, 60 epochs) plus early stopping.
    fn default() -> Self {
        TrainConfig {
            epochs: 60,
            batch_size: 64,
            learning_rate: 1e-3,
            weight_decay: 0.0,
            seed: 0,
            patience: Some(10),
        }
    }
}

impl TrainConfig {
    /// Checks each field, naming the first bad one.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad =
            |field: &'static str, reason: String| Err(TrainError::InvalidConfig { field, reason });
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
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("must be a finite number >= 0, got {}", self.weight_decay),
            );
        }
        if self.patience == Some(0) {
            return bad("patience", "must be at least 1 when set, got 0".into());
        }
        Ok(())
    }
}

/// What one epoch achieved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean cross-entropy over the epoch's training rows.
    pub train_loss: f64,
    /// Share of training rows classified correctly during the epoch (while learning).
    pub train_accuracy: f64,
    /// Share of validation rows classified correctly after the epoch (0 without a
    /// validation split).
    pub validation_accuracy: f64,
    /// Wall time of the epoch, validation included.
    pub seconds: f64,
}

impl EpochMetrics {
    /// An epoch's figures from its summed training loss (`[1]`, rows × batch mean), its count
    /// of correct training predictions and its validation accuracy.
    pub(crate) fn from_sums(
        epoch: usize,
        loss_sum: Tensor<1>,
        correct: Tensor<1, Int>,
        n_train: usize,
        validation_accuracy: f64,
        started: Instant,
    ) -> Self {
        let train_loss: f32 = loss_sum.into_scalar();
        let train_correct: i64 = correct.into_scalar();
        EpochMetrics {
            epoch,
            train_loss: f64::from(train_loss) / n_train as f64,
            train_accuracy: train_correct as f64 / n_train as f64,
            validation_accuracy,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// The validation split's accuracy and mean cross-entropy for a model's logits over it.
pub(crate) fn score_validation(
    logits: Tensor<2>,
    labels: Tensor<1, Int>,
    loss_fn: &CrossEntropyLoss,
) -> (f64, f64) {
    let rows = labels.dims()[0];
    let loss: f32 = loss_fn
        .forward(logits.clone(), labels.clone())
        .into_scalar();
    let hits: i64 = logits
        .argmax(1)
        .reshape([rows])
        .equal(labels)
        .int()
        .sum()
        .into_scalar();
    (hits as f64 / rows as f64, f64::from(loss))
}

/// The epoch whose weights training keeps: the best validation accuracy, ties going to the
/// lower validation loss. Without a validation split every epoch improves, so the last one
/// is kept.
pub(crate) struct BestEpoch {
    accuracy: f64,
    loss: f64,
    pub(crate) epoch: usize,
    pub(crate) layers: Vec<LayerTensors>,
}

impl BestEpoch {
    /// Whether an epoch with these validation figures replaces `best`.
    pub(crate) fn improved_on(
        best: &Option<BestEpoch>,
        has_validation: bool,
        accuracy: f64,
        loss: f64,
    ) -> bool {
        match best {
            None => true,
            Some(b) => {
                !has_validation
                    || accuracy > b.accuracy
                    || (accuracy == b.accuracy && loss < b.loss)
            }
        }
    }

    pub(crate) fn new(accuracy: f64, loss: f64, epoch: usize, layers: Vec<LayerTensors>) -> Self {
        BestEpoch {
            accuracy,
            loss,
            epoch,
            layers,
        }
    }
}

/// The result of [`train_mlp`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// The model with the best validation score, ready to write or serve.
    pub artifact: Artifact,
    /// One entry per epoch run.
    pub epochs: Vec<EpochMetrics>,
    /// The epoch whose weights are in the artifact (1-based).
    pub best_epoch: usize,
    /// The artifact's evaluation on the test split.
    pub test: Evaluation,
    /// The artifact's evaluation on the validation split.
    pub validation: Evaluation,
    /// Wall time of the epochs (setup and final evaluation excluded).
    pub train_seconds: f64,
}

/// Why training could not run.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum TrainError {
    /// A training setting is out of range.
    #[error("train.{field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// The model shape is invalid.
    #[error("model: {0}")]
    Model(#[from] MlpError),
    /// The model and the data do not fit together.
    #[error("model.{field} is {model} but the data has {data}")]
    ModelDataMismatch {
        field: &'static str,
        model: usize,
        data: usize,
    },
    /// The data cannot be trained on.
    #[error("{split} split: {reason}")]
    Data { split: &'static str, reason: String },
    /// The compute device could not be chosen.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The trained model could not be packaged (a bug if it ever happens).
    #[error("the trained model could not be packaged: {0}")]
    Package(String),
}

/// Checks that the splits fit the model and each other.
pub(crate) fn check_splits(
    splits: &Splits,
    model: &MlpConfig,
    cfg: &TrainConfig,
) -> Result<(), TrainError> {
    let train = &splits.train;
    if train.rows() == 0 {
        return Err(TrainError::Data {
            split: "train",
            reason: "has no rows".into(),
        });
    }
    if model.input != train.n_features {
        return Err(TrainError::ModelDataMismatch {
            field: "input",
            model: model.input,
            data: train.n_features,
        });
    }
    if model.classes != train.n_classes() {
        return Err(TrainError::ModelDataMismatch {
            field: "classes",
            model: model.classes,
            data: train.n_classes(),
        });
    }
    for (name, split) in [
        ("train", &splits.train),
        ("validation", &splits.validation),
        ("test", &splits.test),
    ] {
        if split.n_features != train.n_features {
            return Err(TrainError::Data {
                split: name,
                reason: format!(
                    "has {} features, the training split {}",
                    split.n_features, train.n_features
                ),
            });
        }
        if split.class_labels != train.class_labels {
            return Err(TrainError::Data {
                split: name,
                reason: "has different class labels from the training split".into(),
            });
        }
        if split.features.len() != split.rows() * split.n_features {
            return Err(TrainError::Data {
                split: name,
                reason: format!(
                    "holds {} feature values for {} rows of {}",
                    split.features.len(),
                    split.rows(),
                    split.n_features
                ),
            });
        }
        if let Some(row) = split
            .labels
            .iter()
            .position(|&l| l as usize >= model.classes)
        {
            return Err(TrainError::Data {
                split: name,
                reason: format!(
                    "row {} has class index {} of {}",
                    row + 1,
                    split.labels[row],
                    model.classes
                ),
            });
        }
    }
    if cfg.patience.is_some() && splits.validation.rows() == 0 {
        return Err(TrainError::InvalidConfig {
            field: "patience",
            reason: "needs a validation split, but it is empty".into(),
        });
    }
    Ok(())
}

/// Uploads standardised features as a `[rows, n_features]` tensor.
pub(crate) fn feature_tensor(
    data: &Dataset,
    standardizer: &Standardizer,
    device: &Device,
) -> Tensor<2> {
    Tensor::<2>::from_data(
        TensorData::new(standardizer.transform(data), [data.rows(), data.n_features]),
        device,
    )
}

/// Uploads labels as a `[rows]` integer tensor.
pub(crate) fn label_tensor(data: &Dataset, device: &Device) -> Tensor<1, Int> {
    let labels: Vec<i64> = data.labels.iter().map(|&l| i64::from(l)).collect();
    Tensor::<1, Int>::from_data(TensorData::new(labels, [data.rows()]), device)
}

/// Trains `model` on `splits.train`, selects the epoch with the best validation accuracy
/// (ties go to the lower validation loss), and evaluates it on the validation and test
/// splits. `on_epoch` is called after every epoch, for progress reports.
pub fn train_mlp(
    splits: &Splits,
    model: &MlpConfig,
    cfg: &TrainConfig,
    on_epoch: &mut dyn FnMut(&EpochMetrics),
) -> Result<TrainOutcome, TrainError> {
    cfg.validate()?;
    model.validate()?;
    check_splits(splits, model, cfg)?;

    let base_device = try_device()?;
    let device = base_device.clone().autodiff();
    let standardizer = Standardizer::fit(&splits.train);
    let train = &splits.train;
    let n_train = train.rows();
    let x_train = feature_tensor(train, &standardizer, &device);
    let y_train = label_tensor(train, &device);
    let has_validation = splits.validation.rows() > 0;
    let x_validation = feature_tensor(&splits.validation, &standardizer, &base_device);
    let y_validation = label_tensor(&splits.validation, &base_device);

    let mut network: Mlp = model.init_seeded(cfg.seed ^ INIT_STREAM, &device);
    let mut adam = AdamConfig::new().with_epsilon(1e-8);
    if cfg.weight_decay > 0.0 {
        adam = adam.with_weight_decay(Some(WeightDecayConfig::new(cfg.weight_decay as f32)));
    }
    let mut optimizer = adam.init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let validation_loss_fn = CrossEntropyLossConfig::new().init(&base_device);
    let mut shuffle_rng = StdRng::seed_from_u64(cfg.seed ^ SHUFFLE_STREAM);
    let mut order: Vec<i64> = (0..n_train as i64).collect();

    let mut history = Vec::with_capacity(cfg.epochs);
    let mut best: Option<BestEpoch> = None;
    let mut epochs_without_improvement = 0;
    let started = Instant::now();
    for epoch in 1..=cfg.epochs {
        let epoch_started = Instant::now();
        order.shuffle(&mut shuffle_rng);
        let index = Tensor::<1, Int>::from_data(TensorData::new(order.clone(), [n_train]), &device);
        let x_epoch = x_train.clone().select(0, index.clone());
        let y_epoch = y_train.clone().select(0, index);

        let mut loss_sum = Tensor::<1>::zeros([1], &base_device);
        let mut correct = Tensor::<1, Int>::zeros([1], &base_device);
        for start in (0..n_train).step_by(cfg.batch_size) {
            let end = (start + cfg.batch_size).min(n_train);
            let x = x_epoch.clone().slice(start..end); // [batch, input]
            let y = y_epoch.clone().slice(start..end); // [batch]
            let logits = network.forward(x); // [batch, classes]
            let loss = loss_fn.forward(logits.clone(), y.clone()); // [1], batch mean
            loss_sum = loss_sum + loss.clone().inner() * ((end - start) as f32);
            let predicted = logits.inner().argmax(1).reshape([end - start]);
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
            epochs_without_improvement = 0;
        } else {
            epochs_without_improvement += 1;
            if cfg
                .patience
                .is_some_and(|p| epochs_without_improvement >= p)
            {
                break;
            }
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    let Some(BestEpoch {
        epoch: best_epoch,
        layers,
        ..
    }) = best
    else {
        // cfg.epochs >= 1 was checked, so the first epoch always sets `best`.
        return Err(TrainError::Package("no epoch ran".into()));
    };

    let mut artifact = Artifact {
        architecture: Architecture::Mlp(model.clone()),
        layers,
        preprocessing: standardizer,
        feature_names: train.feature_names.clone(),
        class_labels: train.class_labels.clone(),
        lineage: Vec::new(),
        reference: DriftReference::default(),
        metrics: BTreeMap::new(),
    };
    let engine =
        Engine::from_artifact(&artifact).map_err(|e| TrainError::Package(e.to_string()))?;
    artifact.reference = reference_sample(&engine, train)?;
    let test = evaluate(&engine, &splits.test);
    let validation = evaluate(&engine, &splits.validation);

    let best_metrics = &history[best_epoch - 1];
    let metrics = BTreeMap::from([
        ("test_accuracy".to_string(), test.accuracy),
        ("validation_accuracy".to_string(), validation.accuracy),
        ("train_accuracy".to_string(), best_metrics.train_accuracy),
        ("train_loss".to_string(), best_metrics.train_loss),
        ("best_epoch".to_string(), best_epoch as f64),
        ("epochs_run".to_string(), history.len() as f64),
        ("train_seconds".to_string(), train_seconds),
        ("param_count".to_string(), model.param_count() as f64),
    ]);
    let params = serde_json::json!({
        "model": model,
        "train": cfg,
        "rows": {
            "train": splits.train.rows(),
            "validation": splits.validation.rows(),
            "test": splits.test.rows(),
        },
    });
    artifact.push_lineage("train", params, metrics.clone());
    artifact.metrics = metrics;

    Ok(TrainOutcome {
        artifact,
        epochs: history,
        best_epoch,
        test,
        validation,
        train_seconds,
    })
}

/// The drift reference: per-feature quantile bins of the whole training split and the
/// engine's class mix on it.
pub(crate) fn reference_sample(
    engine: &Engine,
    train: &Dataset,
) -> Result<DriftReference, TrainError> {
    let classes = engine
        .classes_batch(&train.features, train.rows())
        .map_err(|e| TrainError::Package(e.to_string()))?;
    let mut counts = vec![0usize; engine.n_classes()];
    for class in classes {
        counts[class] += 1;
    }
    let total = train.rows().max(1) as f64;
    Ok(DriftReference::from_rows(
        &train.features,
        train.n_features,
        counts.iter().map(|&c| c as f64 / total).collect(),
    ))
}
