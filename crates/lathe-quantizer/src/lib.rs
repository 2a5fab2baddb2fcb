//! The quantize stage: loads the input artifact (dense or pruned) and the job's splits,
//! quantizes every weight to 8 or 4 bits (per tensor, channel or group; symmetric or with
//! zero points; `"auto"` picks the fewest bits, then the coarsest granularity, whose
//! validation accuracy stays inside the budget), calibrates the activation ranges on a
//! sample of the training split and stores them for the served model's static activation
//! quantization, and hands on the integer artifact (sparse int8/int4 for a pruned model).
//! Records accuracy, bits, bytes, and in the step's details the chosen granularity and what
//! `"auto"` tried.

use std::time::Instant;

use lathe_model::quantize::{
    Activations, Bits, Calibration, Granularity, QuantizeConfig, outcome_metrics, quantize_mlp,
};
use lathe_proto::spec::{self, AutoOr, QuantizeParams};
use lathe_proto::{Stage, StageTask};
use lathe_runtime::{StageError, StageHandler, StageOutput, TaskContext};
use tracing::Instrument;

/// The quantize stage.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quantizer;

/// The library's settings for the spec's and the job's accuracy budget; bits other than 8,
/// 4 or auto are refused (intake refuses them first).
fn quantize_config(
    p: &QuantizeParams,
    max_accuracy_drop: f64,
) -> Result<QuantizeConfig, StageError> {
    Ok(QuantizeConfig {
        bits: match p.bits {
            AutoOr::Auto => Bits::Auto,
            AutoOr::Value(8) => Bits::Eight,
            AutoOr::Value(4) => Bits::Four,
            AutoOr::Value(b) => {
                return Err(StageError::Permanent(format!(
                    "quantize.bits: {b} bits are not supported (8, 4 or \"auto\")"
                )));
            }
        },
        granularity: p.granularity.map(|g| match g {
            spec::Granularity::PerTensor => Granularity::PerTensor,
            spec::Granularity::PerChannel => Granularity::PerChannel,
            spec::Granularity::Grouped => Granularity::Grouped(p.group_size as usize),
        }),
        group_size: p.group_size as usize,
        symmetric: p.symmetric,
        calibration: match p.calibration {
            spec::Calibration::MinMax => Calibration::MinMax,
            spec::Calibration::Percentile => Calibration::Percentile(p.percentile),
        },
        activations: match p.activations {
            spec::Activations::Static => Activations::Static,
            spec::Activations::Dynamic => Activations::Dynamic,
        },
        calibration_rows: p.calibration_rows as usize,
        max_accuracy_drop,
    })
}

impl StageHandler for Quantizer {
    fn stage(&self) -> Stage {
        Stage::Quantize
    }

    async fn process(&self, ctx: TaskContext, task: StageTask) -> Result<StageOutput, StageError> {
        let started = Instant::now();
        // A pipeline naming quantize without parameters gets the documented defaults, the
        // same `"quantize": {}` gives.
        let params: QuantizeParams = match task.spec.quantize.clone() {
            Some(p) => p,
            None => serde_json::from_value(serde_json::json!({}))
                .map_err(|e| StageError::Permanent(format!("quantize defaults: {e}")))?,
        };
        let cfg = quantize_config(&params, task.spec.budget.max_accuracy_drop)?;
        let load = tracing::info_span!("load dataset", source = %task.spec.dataset.source);
        let splits =
            lathe_runtime::dataset::load_splits(&ctx, &task.spec.dataset, task.spec.train.seed)
                .instrument(load)
                .await?;
        // The previous stage's artifact, or the network imported from model.source when the
        // pipeline starts here.
        let artifact = lathe_runtime::dataset::input_model(&ctx, &task, &splits).await?;
        let span = tracing::info_span!("quantize", bits = ?cfg.bits);
        let outcome = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            quantize_mlp(&artifact, &splits, &cfg)
        })
        .await
        .map_err(|e| StageError::Retryable(format!("quantization thread failed: {e}")))?
        .map_err(|e| StageError::Permanent(e.to_string()))?;

        let metrics = outcome_metrics(&outcome);
        let details = serde_json::json!({
            "test": outcome.test,
            "bits": outcome.bits,
            "granularity": outcome.granularity,
            "auto_search": outcome.search,
            "activation_ranges": outcome.activation_ranges,
        });
        let (accuracy, bits) = (outcome.test.accuracy, outcome.bits);
        let output = StageOutput::from_model(
            "quantize",
            &task,
            outcome.artifact,
            &params,
            metrics,
            started,
            details,
        );
        tracing::info!(
            test_accuracy = accuracy,
            bits,
            artifact_bytes = output.metrics["artifact_bytes"],
            "Quantized"
        );
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lathe_proto::spec::Budget;

    fn params(json: serde_json::Value) -> QuantizeParams {
        serde_json::from_value(json).expect("valid quantize parameters")
    }

    /// `"quantize": {}` under the default budget is what `QuantizeConfig::default()` says it
    /// is, so library callers and jobs get the same quantizer.
    #[test]
    fn the_spec_defaults_are_the_library_defaults() {
        let cfg = quantize_config(
            &params(serde_json::json!({})),
            Budget::default().max_accuracy_drop,
        )
        .expect("the defaults are valid");
        assert_eq!(cfg, QuantizeConfig::default());
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn spec_settings_map_onto_the_library_and_unsupported_bits_are_refused() {
        let cfg = quantize_config(
            &params(serde_json::json!({
                "bits": 4, "granularity": "grouped", "group_size": 16, "symmetric": false,
                "calibration": "min_max", "activations": "dynamic", "calibration_rows": 64
            })),
            0.01,
        )
        .expect("valid settings");
        assert_eq!(
            cfg,
            QuantizeConfig {
                bits: Bits::Four,
                granularity: Some(Granularity::Grouped(16)),
                group_size: 16,
                symmetric: false,
                calibration: Calibration::MinMax,
                activations: Activations::Dynamic,
                calibration_rows: 64,
                max_accuracy_drop: 0.01,
            }
        );
        let Err(StageError::Permanent(why)) =
            quantize_config(&params(serde_json::json!({ "bits": 3 })), 0.005)
        else {
            panic!("3 bits must be refused for good");
        };
        assert!(why.starts_with("quantize.bits"), "{why}");
    }
}
