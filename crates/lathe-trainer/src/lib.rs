//! The train stage: loads the job's dataset (built-in, a file on the worker, or the
//! `lathe-datasets` bucket), splits it by seed, trains the MLP the spec describes with burn,
//! evaluates it on the test split, and hands a self-describing artifact to the next stage.
//!

use std::collections::BTreeMap;

use lathe_model::artifact::LineageEntry;
use lathe_model::mlp::MlpConfig;
use lathe_model::train::{TrainConfig, train_mlp};
use lathe_proto::{Progress, Stage, StageTask, now_ms};
use lathe_runtime::{StageError, StageHandler, StageOutput, TaskContext};
use tracing::Instrument;

/// The train stage.
#[derive(Clone, Copy, Debug, Default)]
pub struct Trainer;

impl StageHandler for Trainer {
    fn stage(&self) -> Stage {
        Stage::Train
    }

    async fn process(&self, ctx: TaskContext, task: StageTask) -> Result<StageOutput, StageError> {
        let spec = task.spec;
        let load = tracing::info_span!("load dataset", source = %spec.dataset.source);
        let splits = lathe_runtime::dataset::load_splits(&ctx, &spec.dataset, spec.train.seed)
            .instrument(load)
            .await?;
        let model = MlpConfig {
            input: splits.train.n_features,
            hidden: spec.model.hidden.iter().map(|w| *w as usize).collect(),
            classes: splits.train.n_classes(),
        };
        let train_cfg = TrainConfig {
            epochs: spec.train.epochs as usize,
            batch_size: spec.train.batch_size as usize,
            learning_rate: spec.train.learning_rate,
            weight_decay: spec.train.weight_decay,
            seed: spec.train.seed,
            patience: spec.train.patience.map(|p| p as usize),
        };
        tracing::info!(
            rows_train = splits.train.rows(),
            rows_validation = splits.validation.rows(),
            rows_test = splits.test.rows(),
            features = model.input,
            classes = model.classes,
            "Training"
        );
        let report = ctx.progress_reporter();
        let epochs = train_cfg.epochs as u32;
        let params_json = serde_json::to_value(&spec.train).unwrap_or_default();
        let span = tracing::info_span!("train epochs", epochs);
        let outcome = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            let mut on_epoch = |m: &lathe_model::train::EpochMetrics| {
                let mut metrics = BTreeMap::new();
                metrics.insert("train_loss".into(), m.train_loss);
                metrics.insert("train_accuracy".into(), m.train_accuracy);
                metrics.insert("validation_accuracy".into(), m.validation_accuracy);
                report(Progress {
                    epoch: m.epoch as u32,
                    epochs,
                    metrics,
                });
            };
            train_mlp(&splits, &model, &train_cfg, &mut on_epoch)
        })
        .await
        .map_err(|e| StageError::Retryable(format!("training thread failed: {e}")))?
        .map_err(|e| StageError::Permanent(e.to_string()))?;

        let mut artifact = outcome.artifact;
        let mut metrics = BTreeMap::new();
        metrics.insert("test_accuracy".to_string(), outcome.test.accuracy);
        metrics.insert(
            "validation_accuracy".to_string(),
            outcome.validation.accuracy,
        );
        metrics.insert("parameters".to_string(), artifact.param_count() as f64);
        metrics.insert("epochs_run".to_string(), outcome.epochs.len() as f64);
        metrics.insert("best_epoch".to_string(), outcome.best_epoch as f64);
        metrics.insert("train_seconds".to_string(), outcome.train_seconds);
        artifact.lineage.push(LineageEntry {
            stage: "train".into(),
            params: params_json,
            metrics: metrics.clone(),
            created_unix_ms: now_ms(),
        });
        let bytes = artifact.to_bytes();
        metrics.insert("artifact_bytes".to_string(), bytes.len() as f64);
        tracing::info!(
            test_accuracy = outcome.test.accuracy,
            parameters = artifact.param_count(),
            artifact_bytes = bytes.len(),
            "Trained"
        );
        Ok(StageOutput {
            artifact: Some(bytes),
            metrics,
            details: Some(serde_json::json!({
                "test": outcome.test,
                "epochs": outcome.epochs,
            })),
        })
    }
}
