//! The distill stage: takes the trainer's artifact as the teacher, distils it into a smaller
//! student on the job's own splits (the same as the trainer's), and hands the student's
//! artifact on, with the teacher's metrics, T, α and the student's size in its lineage.
//!
//! The student's hidden widths come from `distill.student_hidden`; without them the stage
//! tries one-hidden-layer widths from small to large and keeps the first whose validation
//! accuracy is within `budget.max_accuracy_drop` of the teacher's, recording every width it
//! tried.

use std::collections::BTreeMap;
use std::time::Instant;

use lathe_model::distill::{DistillConfig, DistillOutcome, auto_distill, distill_mlp};
use lathe_model::mlp::MlpConfig;
use lathe_model::train::EpochMetrics;
use lathe_proto::{Progress, Stage, StageTask};
use lathe_runtime::{StageError, StageHandler, StageOutput, TaskContext};
use tracing::Instrument;

/// The distill stage.
#[derive(Clone, Copy, Debug, Default)]
pub struct Distiller;

/// The distillation settings for a job: T and α from the spec (or their defaults), the
/// student's epochs from `distill.epochs` or else `DEFAULT_DISTILL_EPOCHS` (300), and the
/// optimiser settings and seed of the job's training. The teacher-labelled augmentation is
/// the library's default, the setting that measured best (`lathe-distill-bench`).
fn distill_config(spec: &lathe_proto::JobSpec) -> DistillConfig {
    let defaults = DistillConfig::default();
    let (temperature, alpha, epochs) = match &spec.distill {
        Some(p) => (p.temperature, p.alpha, p.epochs),
        None => (defaults.temperature, defaults.alpha, None),
    };
    DistillConfig {
        temperature,
        alpha,
        epochs: epochs.unwrap_or(lathe_proto::spec::DEFAULT_DISTILL_EPOCHS) as usize,
        batch_size: spec.train.batch_size as usize,
        learning_rate: spec.train.learning_rate,
        seed: spec.train.seed,
        ..defaults
    }
}

impl StageHandler for Distiller {
    fn stage(&self) -> Stage {
        Stage::Distill
    }

    async fn process(&self, ctx: TaskContext, task: StageTask) -> Result<StageOutput, StageError> {
        let load = tracing::info_span!("load dataset", source = %task.spec.dataset.source);
        let splits =
            lathe_runtime::dataset::load_splits(&ctx, &task.spec.dataset, task.spec.train.seed)
                .instrument(load)
                .await?;
        // The trainer's artifact, or the network imported from model.source when the
        // pipeline starts here.
        let teacher = lathe_runtime::dataset::input_model(&ctx, &task, &splits).await?;
        let spec = task.spec;
        let cfg = distill_config(&spec);
        let student_hidden: Option<Vec<usize>> = spec
            .distill
            .as_ref()
            .and_then(|p| p.student_hidden.as_ref())
            .map(|h| h.iter().map(|&w| w as usize).collect());
        let max_drop = spec.budget.max_accuracy_drop;
        tracing::info!(
            teacher_parameters = teacher.param_count(),
            temperature = cfg.temperature,
            alpha = cfg.alpha,
            epochs = cfg.epochs,
            student = ?student_hidden,
            "Distilling"
        );

        let report = ctx.progress_reporter();
        let epochs = cfg.epochs as u32;
        let span = tracing::info_span!("distill epochs", epochs);
        let started = Instant::now();
        let cfg_for_thread = cfg.clone();
        let result = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            let progress = |width: Option<usize>, m: &EpochMetrics| {
                let mut metrics = BTreeMap::new();
                metrics.insert("train_loss".into(), m.train_loss);
                metrics.insert("train_accuracy".into(), m.train_accuracy);
                metrics.insert("validation_accuracy".into(), m.validation_accuracy);
                if let Some(width) = width {
                    metrics.insert("student_width".into(), width as f64);
                }
                report(Progress {
                    epoch: m.epoch as u32,
                    epochs,
                    metrics,
                });
            };
            match student_hidden {
                Some(hidden) => {
                    let config = teacher.mlp_config();
                    let student = MlpConfig::new(config.input, hidden, config.classes);
                    distill_mlp(&splits, &teacher, &student, &cfg_for_thread, &mut |m| {
                        progress(None, m)
                    })
                    .map(|outcome| (outcome, None))
                }
                None => auto_distill(&splits, &teacher, &cfg_for_thread, max_drop, &mut |w, m| {
                    progress(Some(w), m)
                })
                .map(|auto| {
                    let tried = serde_json::json!({
                        "tried": auto.tried,
                        "within_budget": auto.within_budget,
                        "max_accuracy_drop": max_drop,
                    });
                    (auto.chosen, Some(tried))
                }),
            }
        })
        .await
        .map_err(|e| StageError::Retryable(format!("distillation thread failed: {e}")))?
        .map_err(|e| StageError::Permanent(e.to_string()))?;
        let seconds = started.elapsed().as_secs_f64();
        let (outcome, auto): (DistillOutcome, Option<serde_json::Value>) = result;

        let artifact = outcome.artifact;
        let bytes = artifact.to_bytes();
        let student = artifact.mlp_config();
        let mut metrics = BTreeMap::new();
        metrics.insert("test_accuracy".to_string(), outcome.test.accuracy);
        metrics.insert(
            "validation_accuracy".to_string(),
            outcome.validation.accuracy,
        );
        metrics.insert("parameters".to_string(), artifact.param_count() as f64);
        metrics.insert("artifact_bytes".to_string(), bytes.len() as f64);
        metrics.insert(
            "teacher_test_accuracy".to_string(),
            outcome.teacher_test_accuracy,
        );
        metrics.insert(
            "teacher_validation_accuracy".to_string(),
            outcome.teacher_validation_accuracy,
        );
        metrics.insert("student_layers".to_string(), student.hidden.len() as f64);
        for (i, width) in student.hidden.iter().enumerate() {
            metrics.insert(format!("student_width_{i}"), *width as f64);
        }
        metrics.insert("temperature".to_string(), cfg.temperature);
        metrics.insert("alpha".to_string(), cfg.alpha);
        metrics.insert("epochs_run".to_string(), outcome.epochs.len() as f64);
        metrics.insert("best_epoch".to_string(), outcome.best_epoch as f64);
        metrics.insert("seconds".to_string(), seconds);
        tracing::info!(
            test_accuracy = outcome.test.accuracy,
            teacher_test_accuracy = outcome.teacher_test_accuracy,
            parameters = artifact.param_count(),
            artifact_bytes = bytes.len(),
            "Distilled"
        );
        Ok(StageOutput {
            artifact: Some(bytes),
            metrics,
            details: Some(serde_json::json!({
                "student_hidden": student.hidden,
                "distill": cfg,
                "auto": auto,
                "test": outcome.test,
                "epochs": outcome.epochs,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> lathe_proto::JobSpec {
        serde_json::from_str(json).expect("a valid spec")
    }

    #[test]
    fn spec_settings_reach_the_distiller() {
        let cfg = distill_config(&spec(
            r#"{"name": "d", "dataset": {"source": "builtin:digits"},
                "train": {"epochs": 40, "batch_size": 32, "learning_rate": 0.002, "seed": 7},
                "distill": {"temperature": 2.5, "alpha": 0.25, "epochs": 90},
                "pipeline": ["train", "distill"]}"#,
        ));
        assert_eq!(cfg.temperature, 2.5);
        assert_eq!(cfg.alpha, 0.25);
        assert_eq!(cfg.epochs, 90);
        assert_eq!(cfg.batch_size, 32);
        assert_eq!(cfg.learning_rate, 0.002);
        assert_eq!(cfg.seed, 7);
    }

    #[test]
    fn without_distill_epochs_the_default_is_used() {
        let cfg = distill_config(&spec(
            r#"{"name": "d", "dataset": {"source": "builtin:digits"},
                "train": {"epochs": 40}, "pipeline": ["train", "distill"]}"#,
        ));
        assert_eq!(
            cfg.epochs,
            lathe_proto::spec::DEFAULT_DISTILL_EPOCHS as usize
        );
        assert_eq!(cfg.temperature, 4.0);
        assert_eq!(cfg.alpha, 0.7);
    }
}
