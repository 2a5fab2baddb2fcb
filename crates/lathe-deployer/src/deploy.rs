//! The deploy step: fetch and verify the artifact (digest), load it in the inference engine,
//! evaluate it on the job's test split, apply the spec's gates (minimum accuracy, largest
//! drop against the trained model, p99 latency of one row on a short local benchmark),
//! register the version by compare-and-set and route traffic to it (`replace`, or `canary`
//! with its share). A gate failure fails the job with the measured figures and thresholds,
//! and nothing is registered. A redelivered task finds the version its job step registered
//! and never registers a second one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lathe_model::{Artifact, Engine};
use lathe_proto::registry::{LineageStep, NewVersion};
use lathe_proto::spec::{DeployParams, DeployStrategy};
use lathe_proto::{ArtifactRef, Stage, StageTask, names};
use lathe_runtime::registry::RegistryOpError;
use lathe_runtime::{StageError, StageHandler, StageOutput, TaskContext};
use tracing::Instrument;

use crate::serving::Serving;

/// Single-row inferences timed by the latency gate (after as many warm-up rows).
const LATENCY_ROWS: usize = 2_000;

/// The deploy stage. With a [`Serving`] (the deployer process always has one), the new
/// version is handed to this replica's serving side already loaded, and the step returns
/// once this replica routes to it.
#[derive(Clone, Default)]
pub struct Deployer {
    serving: Option<Serving>,
}

impl Deployer {
    pub fn new(serving: Option<Serving>) -> Self {
        Deployer { serving }
    }
}

/// What the deploy step measured before the gates.
#[derive(Debug, Clone)]
pub struct Measured {
    pub test_accuracy: f64,
    pub trained_accuracy: Option<f64>,
    pub p50_latency_ms: f64,
    pub p99_latency_ms: f64,
}

/// Evaluates the engine on the test split and times single rows.
pub fn measure(
    engine: &Engine,
    artifact: &Artifact,
    test: &lathe_model::Dataset,
) -> Result<Measured, String> {
    let eval = lathe_model::eval::try_evaluate(engine, test).map_err(|e| e.to_string())?;
    let n = test.rows();
    if n == 0 {
        return Err("the test split is empty".into());
    }
    let width = test.n_features;
    let row = |i: usize| &test.features[(i % n) * width..(i % n + 1) * width];
    for i in 0..LATENCY_ROWS.min(200) {
        engine.predict(row(i)).map_err(|e| e.to_string())?;
    }
    let mut times: Vec<f64> = (0..LATENCY_ROWS)
        .map(|i| {
            let t = Instant::now();
            let p = engine.predict(row(i));
            let dt = t.elapsed().as_secs_f64() * 1e3;
            std::hint::black_box(p.ok());
            dt
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    // The trained model's accuracy: the first stage of the lineage that measured one.
    let trained_accuracy = artifact
        .lineage
        .iter()
        .find_map(|l| l.metrics.get("test_accuracy").copied());
    Ok(Measured {
        test_accuracy: eval.accuracy,
        trained_accuracy,
        p50_latency_ms: q(0.5),
        p99_latency_ms: q(0.99),
    })
}

/// Every gate the measurement breaks, each with its figure and threshold.
pub fn gate_failures(m: &Measured, p: &DeployParams, budget_drop: f64) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(min) = p.min_accuracy
        && m.test_accuracy < min
    {
        out.push(format!(
            "deploy.min_accuracy: test accuracy {:.4} is below the minimum {min:.4}",
            m.test_accuracy
        ));
    }
    let max_drop = p.max_accuracy_drop.unwrap_or(budget_drop);
    if let Some(trained) = m.trained_accuracy {
        let drop = trained - m.test_accuracy;
        if drop > max_drop + 1e-9 {
            let field = if p.max_accuracy_drop.is_some() {
                "deploy.max_accuracy_drop"
            } else {
                "budget.max_accuracy_drop"
            };
            out.push(format!(
                "{field}: test accuracy {:.4} is {drop:.4} below the trained model's {trained:.4}, more than the allowed {max_drop:.4}",
                m.test_accuracy
            ));
        }
    }
    if let Some(budget) = p.p99_latency_ms
        && m.p99_latency_ms > budget
    {
        out.push(format!(
            "deploy.p99_latency_ms: one row's p99 latency {:.4} ms is over the budget {budget} ms",
            m.p99_latency_ms
        ));
    }
    out
}

fn registry_error(e: RegistryOpError) -> StageError {
    match e {
        RegistryOpError::Refused(r) => StageError::Permanent(r.to_string()),
        RegistryOpError::Runtime(r) => StageError::Retryable(r.to_string()),
    }
}

impl StageHandler for Deployer {
    fn stage(&self) -> Stage {
        Stage::Deploy
    }

    async fn process(&self, ctx: TaskContext, task: StageTask) -> Result<StageOutput, StageError> {
        let started = Instant::now();
        let params = task.spec.deploy.clone().ok_or_else(|| {
            StageError::Permanent("deploy: required when the pipeline has `deploy`".into())
        })?;
        let model = params.model.clone();
        let registry = ctx.resources.registry.clone();
        let by = ctx.resources.worker.id.clone();

        // A redelivered task whose version is already registered only reports it.
        if let Some((entry, _)) = registry
            .get(&model)
            .await
            .map_err(|e| StageError::Retryable(e.to_string()))?
            && let Some(v) = entry.version_of_job(task.job_id, task.step)
        {
            tracing::info!(%model, version = v.version, "Already registered by this job step");
            let mut metrics = v.metrics.clone();
            metrics.insert("version".into(), v.version as f64);
            return Ok(StageOutput {
                artifact: None,
                metrics,
                details: Some(
                    serde_json::json!({"model": model, "version": v.version, "registered": false}),
                ),
            });
        }

        let load = tracing::info_span!("load dataset", source = %task.spec.dataset.source);
        let splits =
            lathe_runtime::dataset::load_splits(&ctx, &task.spec.dataset, task.spec.train.seed)
                .instrument(load)
                .await?;
        // The artifact to deploy: the previous stage's (digest checked on read), or an
        // imported network stored now so that the registry can point at it.
        let (artifact_ref, artifact): (ArtifactRef, Artifact) = match &task.input {
            Some(r) => {
                let span = tracing::info_span!("load artifact", artifact = %r.name);
                let bytes = ctx.load_artifact(r).instrument(span).await?;
                let a = Artifact::from_bytes(&bytes)
                    .map_err(|e| StageError::Permanent(format!("artifact `{}`: {e}", r.name)))?;
                (r.clone(), a)
            }
            None => {
                let a = lathe_runtime::dataset::input_model(&ctx, &task, &splits).await?;
                let name = names::artifact_name(task.job_id, task.step, Stage::Deploy);
                let r = ctx
                    .resources
                    .artifacts
                    .put(&name, &a.to_bytes())
                    .await
                    .map_err(|e| StageError::Retryable(e.to_string()))?;
                (r, a)
            }
        };
        if artifact.class_labels != splits.test.class_labels {
            return Err(StageError::Permanent(format!(
                "artifact `{}`: its classes {:?} are not the dataset's {:?}",
                artifact_ref.name, artifact.class_labels, splits.test.class_labels
            )));
        }

        let span = tracing::info_span!("evaluate and gate");
        let test = splits.test.clone();
        let a = artifact.clone();
        let name = artifact_ref.name.clone();
        let (engine, measured) = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            let engine =
                Engine::from_artifact(&a).map_err(|e| format!("artifact `{name}`: {e}"))?;
            let m = measure(&engine, &a, &test)?;
            Ok::<_, String>((engine, m))
        })
        .await
        .map_err(|e| StageError::Retryable(format!("evaluation thread failed: {e}")))?
        .map_err(StageError::Permanent)?;

        let failures = gate_failures(&measured, &params, task.spec.budget.max_accuracy_drop);
        if !failures.is_empty() {
            tracing::warn!(%model, ?failures, "Deploy gates failed");
            return Err(StageError::Permanent(format!(
                "deploy gates failed, nothing was promoted: {}",
                failures.join("; ")
            )));
        }

        let mut metrics = BTreeMap::new();
        metrics.insert("test_accuracy".into(), measured.test_accuracy);
        if let Some(t) = measured.trained_accuracy {
            metrics.insert("trained_accuracy".into(), t);
            metrics.insert("accuracy_drop".into(), t - measured.test_accuracy);
        }
        metrics.insert("p50_latency_ms".into(), measured.p50_latency_ms);
        metrics.insert("p99_latency_ms".into(), measured.p99_latency_ms);
        metrics.insert("artifact_bytes".into(), artifact_ref.bytes as f64);
        // Non-zeros, as the prune and quantize steps count them.
        metrics.insert("parameters".into(), artifact.nonzero_param_count() as f64);
        let lineage = artifact
            .lineage
            .iter()
            .map(|l| LineageStep {
                stage: l.stage.clone(),
                metrics: l.metrics.clone(),
            })
            .collect();
        let new = NewVersion {
            job_id: task.job_id,
            step: task.step,
            artifact: artifact_ref.clone(),
            metrics: metrics.clone(),
            lineage,
            strategy: params.strategy,
            canary_percent: params.canary_percent,
        };
        if let Some(s) = &self.serving {
            s.preload(&artifact_ref.digest, Arc::new(engine));
        }
        let register = tracing::info_span!("register", lathe.model = %model);
        let (entry, (version, created)) = registry
            .update(&model, true, |e| Ok(e.register(new.clone(), &by)))
            .instrument(register)
            .await
            .map_err(registry_error)?;
        let canary = entry.canary.as_ref().is_some_and(|c| c.version == version);
        tracing::info!(%model, version, created, canary, "Registered");

        // This replica loads the version from its cache; wait until it routes to it, so that
        // the step ends with the version really serving here.
        if let Some(s) = &self.serving {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !s.serving_versions(&model).contains(&version) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        metrics.insert("version".into(), version as f64);
        if canary {
            metrics.insert("canary_percent".into(), params.canary_percent);
        }
        metrics.insert("seconds".into(), started.elapsed().as_secs_f64());
        Ok(StageOutput {
            artifact: None,
            metrics,
            details: Some(serde_json::json!({
                "model": model,
                "version": version,
                "strategy": match params.strategy {
                    DeployStrategy::Replace => "replace",
                    DeployStrategy::Canary => "canary",
                },
                "canary": canary,
                "registered": created,
            })),
        })
    }
}
