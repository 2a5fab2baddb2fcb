//! The prune stage: loads the input artifact and the job's splits (the same the trainer
//! used), prunes with the spec's saliency, structure, scope and gradual schedule (masked
//! fine-tuning after each step), or searches the highest sparsity inside the accuracy
//! budget for `"auto"`, and hands on an artifact whose pruned weights are stored sparse.
//! It records accuracy, non-zero parameters, sparsity overall and per layer, and bytes.

use std::time::Instant;

use lathe_model::prune::{
    PruneConfig, Saliency, Scope, Structure, Target, outcome_metrics, prune_mlp,
};
use lathe_proto::spec::{AutoOr, PruneMethod, PruneParams, PruneScope, PruneStructure};
use lathe_proto::{Progress, Stage, StageTask};
use lathe_runtime::{StageError, StageHandler, StageOutput, TaskContext};
use tracing::Instrument;

/// The prune stage.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pruner;

/// The library's settings for the spec's.
fn prune_config(p: &PruneParams, task: &StageTask) -> PruneConfig {
    PruneConfig {
        saliency: match p.method {
            PruneMethod::Magnitude => Saliency::Magnitude,
            PruneMethod::Taylor => Saliency::Taylor,
        },
        structure: match p.structure {
            PruneStructure::Unstructured => Structure::Unstructured,
            PruneStructure::Structured => Structure::Structured,
        },
        scope: match p.scope {
            PruneScope::Global => Scope::Global,
            PruneScope::Layer => Scope::Layer,
        },
        target: match p.target_sparsity {
            AutoOr::Auto => Target::Auto,
            AutoOr::Value(s) => Target::Fixed(s),
        },
        steps: p.steps as usize,
        finetune_epochs: p.finetune_epochs as usize,
        batch_size: task.spec.train.batch_size as usize,
        learning_rate: task.spec.train.learning_rate,
        seed: task.spec.train.seed,
        max_accuracy_drop: task.spec.budget.max_accuracy_drop,
    }
}

impl StageHandler for Pruner {
    fn stage(&self) -> Stage {
        Stage::Prune
    }

    async fn process(&self, ctx: TaskContext, task: StageTask) -> Result<StageOutput, StageError> {
        let started = Instant::now();
        // A pipeline naming prune without parameters gets the documented defaults, the
        // same `"prune": {}` gives.
        let params: PruneParams = match task.spec.prune.clone() {
            Some(p) => p,
            None => serde_json::from_value(serde_json::json!({}))
                .map_err(|e| StageError::Permanent(format!("prune defaults: {e}")))?,
        };
        let cfg = prune_config(&params, &task);
        let load = tracing::info_span!("load dataset", source = %task.spec.dataset.source);
        let splits =
            lathe_runtime::dataset::load_splits(&ctx, &task.spec.dataset, task.spec.train.seed)
                .instrument(load)
                .await?;
        // The previous stage's artifact, or the network imported from model.source when the
        // pipeline starts here.
        let artifact = lathe_runtime::dataset::input_model(&ctx, &task, &splits).await?;
        let report = ctx.progress_reporter();
        let steps_total = match cfg.target {
            Target::Fixed(_) => cfg.steps as u32,
            Target::Auto => 0,
        };
        let span = tracing::info_span!("prune", method = ?cfg.saliency, structure = ?cfg.structure);
        let run_cfg = cfg.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            let mut on_step = |s: &lathe_model::prune::StepReport| {
                let mut metrics = std::collections::BTreeMap::new();
                metrics.insert("target".into(), s.target);
                metrics.insert("sparsity".into(), s.weight_sparsity);
                metrics.insert("validation_accuracy".into(), s.validation_accuracy);
                report(Progress {
                    epoch: s.step as u32,
                    epochs: steps_total.max(s.step as u32),
                    metrics,
                });
            };
            prune_mlp(&artifact, &splits, &run_cfg, &mut on_step)
        })
        .await
        .map_err(|e| StageError::Retryable(format!("pruning thread failed: {e}")))?
        .map_err(|e| StageError::Permanent(e.to_string()))?;

        let metrics = outcome_metrics(&outcome);
        let details = serde_json::json!({
            "test": outcome.test,
            "steps": outcome.steps,
            "hidden_before": outcome.hidden_before,
            "hidden_after": outcome.hidden_after,
            "layer_sparsity": outcome.layer_sparsity,
        });
        let (accuracy, sparsity) = (outcome.test.accuracy, outcome.sparsity);
        let output = StageOutput::from_model(
            "prune",
            &task,
            outcome.artifact,
            &params,
            metrics,
            started,
            details,
        );
        tracing::info!(
            test_accuracy = accuracy,
            sparsity,
            artifact_bytes = output.metrics["artifact_bytes"],
            "Pruned"
        );
        Ok(output)
    }
}
