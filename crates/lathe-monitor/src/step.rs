//! The `monitor` job step: smoke-test the version the job deployed through the real
//! `lathe.infer.<model>` endpoint (held-out rows, pinned to that version; every answer must
//! equal the artifact's own prediction), record a baseline (round-trip latency, accuracy on
//! those rows), attach the job's monitoring policy to the model, and complete the job with
//! a summary of every stage. The job ends `completed` only when the smoke test passed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use lathe_model::{Artifact, Engine};
use lathe_proto::spec::MonitorParams;
use lathe_proto::{InferReply, Stage, StageTask, codec, names};
use lathe_runtime::{StageError, StageHandler, StageOutput, TaskContext};
use tracing::Instrument;

use crate::watch::{MonitorSettings, default_policy};

/// The monitor stage.
#[derive(Clone, Default)]
pub struct MonitorStep {
    pub settings: MonitorSettings,
}

/// One answer of the smoke test.
enum Answer {
    Reply(InferReply),
    /// Not (yet) answerable: no replica, or the version not loaded; retried.
    NotYet(String),
}

async fn ask(
    client: &async_nats::Client,
    subject: &str,
    version: u32,
    row: &[f32],
) -> Result<Answer, StageError> {
    let mut h = HeaderMap::new();
    h.insert("Content-Type", "application/msgpack");
    h.insert(names::VERSION_HEADER, version.to_string().as_str());
    // The smoke requests carry the job's trace context: the new version's first inferences
    // appear in the job's trace.
    {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        lathe_runtime::trace::inject(&tracing::Span::current().context(), &mut h);
    }
    let body = codec::to_msgpack(&serde_json::json!({ "inputs": row }));
    let reply = match tokio::time::timeout(
        Duration::from_secs(5),
        client.request_with_headers(subject.to_string(), h, body.into()),
    )
    .await
    {
        Err(_) => return Ok(Answer::NotYet("no answer within 5 s".into())),
        Ok(Err(e)) => return Ok(Answer::NotYet(e.to_string())),
        Ok(Ok(m)) => m,
    };
    if let Some(h) = &reply.headers
        && let Some(err) = h.get("Nats-Service-Error")
    {
        let code = h
            .get("Nats-Service-Error-Code")
            .map(|c| c.as_str().to_string())
            .unwrap_or_default();
        if code == "503" {
            return Ok(Answer::NotYet(err.as_str().to_string()));
        }
        return Err(StageError::Permanent(format!(
            "smoke test: {subject} refused a held-out row ({code}): {err}"
        )));
    }
    codec::from_msgpack(&reply.payload)
        .map(Answer::Reply)
        .map_err(|e| StageError::Permanent(format!("smoke test: unreadable reply: {e}")))
}

impl StageHandler for MonitorStep {
    fn stage(&self) -> Stage {
        Stage::Monitor
    }

    async fn process(&self, ctx: TaskContext, task: StageTask) -> Result<StageOutput, StageError> {
        let started = Instant::now();
        let policy: MonitorParams = task.spec.monitor.clone().unwrap_or_else(default_policy);
        let deploy = task.spec.deploy.clone().ok_or_else(|| {
            StageError::Permanent("monitor: the pipeline has no deploy step to watch".into())
        })?;
        let deploy_step = task.spec.step_of(Stage::Deploy).ok_or_else(|| {
            StageError::Permanent("monitor: the pipeline has no deploy step to watch".into())
        })?;
        let model = deploy.model.clone();
        let registry = ctx.resources.registry.clone();
        let (entry, _) = registry
            .get(&model)
            .await
            .map_err(|e| StageError::Retryable(e.to_string()))?
            .ok_or_else(|| {
                StageError::Permanent(format!("monitor: model `{model}` is not in the registry"))
            })?;
        let version = entry
            .version_of_job(task.job_id, deploy_step)
            .cloned()
            .ok_or_else(|| {
                StageError::Permanent(format!(
                    "monitor: this job's deploy step registered no version of `{model}`"
                ))
            })?;

        // The artifact's own predictions on held-out rows (the end of the test split).
        let bytes = ctx.load_artifact(&version.artifact).await?;
        let artifact = Artifact::from_bytes(&bytes).map_err(|e| {
            StageError::Permanent(format!("artifact `{}`: {e}", version.artifact.name))
        })?;
        let engine = Engine::from_artifact(&artifact).map_err(|e| {
            StageError::Permanent(format!("artifact `{}`: {e}", version.artifact.name))
        })?;
        let splits =
            lathe_runtime::dataset::load_splits(&ctx, &task.spec.dataset, task.spec.train.seed)
                .await?;
        let test = &splits.test;
        let n = (policy.smoke_rows as usize).min(test.rows());
        if n == 0 {
            return Err(StageError::Permanent(
                "monitor: the test split is empty".into(),
            ));
        }
        let first = test.rows() - n;
        let rows: Vec<&[f32]> = (first..test.rows()).map(|i| test.row(i)).collect();

        let subject = names::infer_subject(&model);
        let span = tracing::info_span!("smoke test", lathe.model = %model, lathe.version = version.version, rows = n);
        let client = ctx.resources.client.clone();
        let deadline = Instant::now() + self.settings.smoke_timeout;
        let (latencies, correct) = async {
            let mut latencies = Vec::with_capacity(n);
            let mut correct = 0usize;
            for (i, row) in rows.iter().enumerate() {
                let want = engine
                    .predict(row)
                    .map_err(|e| StageError::Permanent(format!("smoke test: row {i}: {e}")))?;
                let reply = loop {
                    let t = Instant::now();
                    match ask(&client, &subject, version.version, row).await? {
                        Answer::Reply(r) => break (r, t.elapsed()),
                        Answer::NotYet(why) => {
                            if Instant::now() > deadline {
                                return Err(StageError::Permanent(format!(
                                    "smoke test: version {} of `{model}` did not answer on {subject} within {} s: {why}",
                                    version.version,
                                    self.settings.smoke_timeout.as_secs()
                                )));
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                };
                let (reply, took) = reply;
                let got = reply.predictions.first().map(|p| p.class as usize);
                if reply.version != version.version || got != Some(want.class) {
                    return Err(StageError::Permanent(format!(
                        "smoke test: held-out row {i} was answered by version {} with class {:?}; version {} predicts {}",
                        reply.version, got, version.version, want.class
                    )));
                }
                correct += usize::from(test.labels[first + i] as usize == want.class);
                latencies.push(took.as_secs_f64() * 1e3);
            }
            Ok::<_, StageError>((latencies, correct))
        }
        .instrument(span)
        .await?;
        let mut sorted = latencies.clone();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];

        let by = format!("lathe-monitor {}", self.settings.replica);
        registry
            .update(&model, false, |e| {
                e.attach_policy(policy.clone(), version.version, &by);
                Ok(())
            })
            .await
            .map_err(|e| StageError::Retryable(e.to_string()))?;

        let mut metrics = BTreeMap::new();
        metrics.insert("version".into(), version.version as f64);
        metrics.insert("smoke_rows".into(), n as f64);
        metrics.insert("smoke_agreement".into(), 1.0);
        metrics.insert("smoke_accuracy".into(), correct as f64 / n as f64);
        metrics.insert("baseline_p50_ms".into(), q(0.5));
        metrics.insert("baseline_p99_ms".into(), q(0.99));
        metrics.insert("seconds".into(), started.elapsed().as_secs_f64());
        // The summary: every earlier stage's accuracy, size and time.
        let summary = match ctx.resources.jobs.get(task.job_id).await {
            Ok(Some((record, _))) => record
                .steps
                .iter()
                .filter(|s| s.step < task.step)
                .map(|s| {
                    serde_json::json!({
                        "stage": s.stage,
                        "test_accuracy": s.metrics.get("test_accuracy"),
                        "artifact_bytes": s.metrics.get("artifact_bytes"),
                        "seconds": match (s.started_at_ms, s.finished_at_ms) {
                            (Some(a), Some(b)) => Some((b.saturating_sub(a)) as f64 / 1000.0),
                            _ => None,
                        },
                    })
                })
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        };
        tracing::info!(%model, version = version.version, rows = n, "Smoke test passed; policy attached");
        Ok(StageOutput {
            artifact: None,
            metrics,
            details: Some(serde_json::json!({
                "model": model,
                "version": version.version,
                "policy": policy,
                "summary": summary,
            })),
        })
    }
}
