//! The stage worker: the one loop every service runs. It pulls its stage's tasks one at a
//! time from the shared durable consumer, keeps them alive with in-progress acks while the
//! stage computes, stores the output artifact, records the result by compare-and-set,
//! publishes the next stage's task (deduplicated by `Nats-Msg-Id`), emits events and acks.
//!
//! Failures: a [`StageError::Retryable`] is naked with backoff until `max_deliver`; a
//! [`StageError::Permanent`] (bad input) fails the job at once. Either way a task that will
//! not be retried is copied to `lathe.dead.<stage>` before it is terminated, and its job is
//! marked failed with the reason. A task redelivered after its step already completed is
//! not computed again: its successor is re-published (the stream drops the duplicate).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer};
use futures::{FutureExt, StreamExt};
use lathe_proto::{
    ArtifactRef, DeadLetter, EventKind, JobId, JobState, Progress, Stage, StageTask, StepState,
    codec, names, now_ms,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::RuntimeError;
use crate::events::EventBuilder;
use crate::jobs::Change;
use crate::provision::Resources;
use crate::trace;

/// What a stage hands back for one task.
#[derive(Debug, Default)]
pub struct StageOutput {
    /// The artifact for the next stage; `None` hands the input on unchanged.
    pub artifact: Option<Vec<u8>>,
    /// Figures recorded in the job record and on the span (accuracy, parameters, bytes…).
    pub metrics: BTreeMap<String, f64>,
    /// Anything else worth keeping in the record (e.g. the per-class evaluation).
    pub details: Option<serde_json::Value>,
}

impl StageOutput {
    /// The output of a stage that turns its input model into a new one (prune, quantize):
    /// its `params`, and `metrics` with `seconds` since `started`, go into the artifact's
    /// lineage entry for `stage` and its metrics, then the stored bytes (`artifact_bytes`)
    /// and the input's (`input_artifact_bytes`, when the task had a stored input) into the
    /// recorded metrics.
    pub fn from_model(
        stage: &str,
        task: &StageTask,
        mut artifact: lathe_model::artifact::Artifact,
        params: &impl serde::Serialize,
        mut metrics: BTreeMap<String, f64>,
        started: std::time::Instant,
        details: serde_json::Value,
    ) -> StageOutput {
        metrics.insert("seconds".into(), started.elapsed().as_secs_f64());
        let params = serde_json::to_value(params).unwrap_or_default();
        artifact.push_lineage(stage, params, metrics.clone());
        artifact.metrics = metrics.clone();
        let out = artifact.to_bytes();
        metrics.insert("artifact_bytes".into(), out.len() as f64);
        if let Some(input) = &task.input {
            metrics.insert("input_artifact_bytes".into(), input.bytes as f64);
        }
        StageOutput {
            artifact: Some(out),
            metrics,
            details: Some(details),
        }
    }
}

/// Why a stage could not finish a task.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Bad input that no retry can fix: the job fails with this reason.
    #[error("{0}")]
    Permanent(String),
    /// A passing fault: the task is retried with backoff.
    #[error("{0}")]
    Retryable(String),
}

impl StageError {
    /// A failed read of a stored object: retried when the server or connection failed,
    /// permanent when the object is missing or corrupt.
    pub fn from_read(e: RuntimeError) -> Self {
        if e.is_transient() {
            StageError::Retryable(e.to_string())
        } else {
            StageError::Permanent(e.to_string())
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            StageError::Permanent(_) => "permanent",
            StageError::Retryable(_) => "retryable",
        }
    }
}

/// A stage's algorithm. Implementations do their heavy work on a blocking thread
/// (`tokio::task::spawn_blocking`) so that the worker's in-progress acks keep flowing.
pub trait StageHandler: Send + Sync + 'static {
    fn stage(&self) -> Stage;
    fn process(
        &self,
        ctx: TaskContext,
        task: StageTask,
    ) -> impl Future<Output = Result<StageOutput, StageError>> + Send;
}

/// What a stage may use while it works on a task.
#[derive(Clone)]
pub struct TaskContext {
    pub resources: Resources,
    pub job_id: JobId,
    pub step: u32,
    progress: mpsc::UnboundedSender<Progress>,
}

impl TaskContext {
    /// A callback that reports progress (e.g. one call per epoch); callable from any thread.
    pub fn progress_reporter(&self) -> impl Fn(Progress) + Send + Sync + 'static {
        let tx = self.progress.clone();
        move |p| {
            let _ = tx.send(p);
        }
    }

    /// Reads the input artifact, checking its digest; a missing or corrupt artifact is a
    /// permanent failure naming the artifact, one that cannot be read now (a timeout while a
    /// cluster elects the bucket's leader) is retried.
    pub async fn load_artifact(&self, r: &ArtifactRef) -> Result<Vec<u8>, StageError> {
        self.resources
            .artifacts
            .get(r)
            .await
            .map_err(StageError::from_read)
    }

    /// Reads a dataset from the `lathe-datasets` bucket.
    pub async fn load_dataset(&self, name: &str) -> Result<Vec<u8>, StageError> {
        self.resources
            .datasets
            .get(name)
            .await
            .map_err(StageError::from_read)
    }
}

/// Runs a stage's worker until `shutdown` is cancelled, then finishes the tasks in flight.
pub async fn run_worker<H: StageHandler>(
    resources: Resources,
    handler: H,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let stage = handler.stage();
    let handler = Arc::new(handler);
    let consumer: consumer::PullConsumer = resources
        .js
        .get_consumer_from_stream(names::stage_consumer(stage), names::WORK_STREAM)
        .await
        .map_err(|e| RuntimeError::nats("get consumer", e))?;

    let advisories = tokio::spawn(watch_max_deliveries(
        resources.clone(),
        stage,
        shutdown.clone(),
    ));
    let permits = Arc::new(Semaphore::new(resources.worker.concurrency));
    let mut in_flight = tokio::task::JoinSet::new();
    tracing::info!(
        stage = stage.as_str(),
        concurrency = resources.worker.concurrency,
        "Worker pulling"
    );

    'pull: loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => break 'pull,
        };
        // One message at a time: a long task must not wait in this replica's buffer while
        // another replica is idle.
        let fetched = tokio::select! {
            f = consumer.fetch().max_messages(1).expires(Duration::from_secs(5)).messages() => f,
            _ = shutdown.cancelled() => break 'pull,
        };
        let mut batch = match fetched {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(stage = stage.as_str(), error = %e, "Pull failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(msg) = tokio::select! {
            m = batch.next() => m,
            _ = shutdown.cancelled() => None,
        } {
            match msg {
                Ok(msg) => {
                    let (res, h) = (resources.clone(), handler.clone());
                    in_flight.spawn(async move {
                        handle(res, h, msg).await;
                        drop(permit);
                    });
                    break;
                }
                Err(e) => {
                    tracing::debug!(stage = stage.as_str(), error = %e, "Pull returned an error");
                }
            }
        }
        while in_flight.try_join_next().is_some() {}
    }
    tracing::info!(
        stage = stage.as_str(),
        in_flight = in_flight.len(),
        "Stopping: finishing tasks in flight"
    );
    while in_flight.join_next().await.is_some() {}
    advisories.abort();
    resources.events.flush().await;
    Ok(())
}

/// One delivery of one task, from decode to ack.
async fn handle<H: StageHandler>(res: Resources, handler: Arc<H>, msg: jetstream::Message) {
    let stage = handler.stage();
    let delivered = msg.info().map(|i| i.delivered.max(1) as u64).unwrap_or(1);
    let subject = msg.subject.to_string();
    let headers = msg.headers.clone();
    let payload = msg.payload.clone();
    let (_, acker) = msg.split();
    let acker = Arc::new(acker);

    let task: StageTask = match codec::from_msgpack(&payload) {
        Ok(t) => t,
        Err(e) => {
            let reason = format!("undecodable task: {e}");
            tracing::warn!(stage = stage.as_str(), %subject, %reason, "Dead-lettering");
            dead_letter(
                &res,
                stage.as_str(),
                &subject,
                None,
                None,
                &reason,
                delivered,
                &payload,
            )
            .await;
            let _ = acker.ack_with(AckKind::Term).await;
            return;
        }
    };
    let job = task.job_id;
    // A task for another stage, or one that decodes but breaks a rule intake applies
    // (published by hand, or altered on the way), is refused before any work, with every bad
    // field named; it is not retried.
    let refusal = if task.stage != stage {
        Some(format!(
            "task for stage `{}` arrived on the `{stage}` work subject",
            task.stage
        ))
    } else {
        task.validate().err().map(|errors| {
            let fields: Vec<String> = errors.iter().map(ToString::to_string).collect();
            format!("invalid task: {}", fields.join("; "))
        })
    };
    if let Some(reason) = refusal {
        give_up(&res, stage, &task, &subject, &reason, delivered, &payload).await;
        let _ = acker.ack_with(AckKind::Term).await;
        return;
    }

    let span = tracing::info_span!(
        "process",
        otel.name = %format!("process {subject}"),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        "error.type" = tracing::field::Empty,
        trace_id = %job.trace_id_hex(),
        span_id = tracing::field::Empty,
        messaging.system = "nats",
        messaging.destination.name = %subject,
        messaging.operation.type = "process",
        messaging.message.id = %names::task_msg_id(job, task.step),
        lathe.job.id = %job,
        lathe.stage = stage.as_str(),
        lathe.step = task.step,
        lathe.delivery = delivered,
    );
    let _ = span.set_parent(trace::extract(headers.as_ref()));
    trace::record_span_id(&span);
    let ctx_span = span.clone();
    async move {
        // The job's record decides whether there is anything left to do.
        let record = match res.jobs.get(job).await {
            Ok(Some((r, _))) => r,
            Ok(None) => {
                let reason = format!("job {job} has no record");
                dead_letter(
                    &res,
                    stage.as_str(),
                    &subject,
                    Some(job),
                    Some(task.step),
                    &reason,
                    delivered,
                    &payload,
                )
                .await;
                let _ = acker.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read job record; retrying later");
                let _ = acker.ack_with(AckKind::Nak(Some(backoff(delivered)))).await;
                return;
            }
        };
        if record.state.is_terminal() {
            tracing::info!(state = ?record.state, "Job already ended; dropping its task");
            let _ = acker.double_ack().await;
            return;
        }
        if let Some(step) = record.steps.get(task.step as usize)
            && step.state == StepState::Completed
        {
            tracing::info!("Step already completed (redelivery); handing on without recomputing");
            let input = step.artifact.clone().or(task.input.clone());
            if hand_on(&res, &task, input, &ctx_span).await.is_ok() {
                let _ = acker.double_ack().await;
            } else {
                let _ = acker.ack_with(AckKind::Nak(Some(backoff(delivered)))).await;
            }
            return;
        }

        let started = now_ms();
        let worker = res.worker.id.clone();
        let mark = res
            .jobs
            .update(job, |r| {
                r.state = JobState::Running;
                if let Some(s) = r.steps.get_mut(task.step as usize) {
                    s.state = StepState::Running;
                    s.attempts += 1;
                    s.worker = Some(worker.clone());
                    s.started_at_ms = Some(started);
                    s.error = None;
                }
                Change::Write
            })
            .await;
        if let Err(e) = mark {
            tracing::warn!(error = %e, "Cannot mark the step running; retrying later");
            let _ = acker.ack_with(AckKind::Nak(Some(backoff(delivered)))).await;
            return;
        }
        res.events
            .emit(
                EventBuilder::new(
                    job,
                    EventKind::StageStarted,
                    format!("{stage} started (delivery {delivered})"),
                )
                .step(task.step, stage),
            )
            .await;
        tracing::info!(delivery = delivered, "Task started");

        // Keep the task ours while the stage computes.
        let heartbeat = {
            let acker = acker.clone();
            let every = res.worker.ack_wait / 3;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = acker.ack_with(AckKind::Progress).await {
                        tracing::warn!(error = %e, "In-progress ack failed");
                    }
                }
            })
        };
        // Progress from the stage (any thread) becomes events.
        let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
        let forward = {
            let events = res.events.clone();
            let (step, job) = (task.step, job);
            tokio::spawn(async move {
                while let Some(p) = rx.recv().await {
                    let msg = format!("{stage} epoch {}/{}", p.epoch, p.epochs);
                    events
                        .emit(
                            EventBuilder::new(job, EventKind::Progress, msg)
                                .step(step, stage)
                                .progress(p),
                        )
                        .await;
                }
            })
        };
        let ctx = TaskContext {
            resources: res.clone(),
            job_id: job,
            step: task.step,
            progress: tx,
        };
        let outcome = std::panic::AssertUnwindSafe(handler.process(ctx, task.clone()))
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                Err(StageError::Retryable(format!(
                    "{stage} stage panicked: {what}"
                )))
            });
        let _ = forward.await;

        // On success the heartbeat keeps the task ours while the result is stored and handed
        // on too; `finish` stops it before it acks.
        match outcome {
            Ok(out) => {
                let held = Held {
                    acker: &acker,
                    heartbeat: heartbeat.abort_handle(),
                };
                finish(&res, &task, out, started, &held, delivered, &ctx_span).await
            }
            Err(err) => {
                heartbeat.abort();
                ctx_span.record("otel.status_code", "ERROR");
                ctx_span.record("error.type", err.kind());
                let last = delivered >= res.worker.max_deliver as u64;
                match err {
                    StageError::Retryable(reason) if !last => {
                        tracing::warn!(%reason, delivery = delivered, "Task failed; will retry");
                        res.events
                            .emit(
                                EventBuilder::new(
                                    job,
                                    EventKind::StageRetry,
                                    format!("{stage} failed, retrying: {reason}"),
                                )
                                .step(task.step, stage),
                            )
                            .await;
                        let _ = acker.ack_with(AckKind::Nak(Some(backoff(delivered)))).await;
                    }
                    StageError::Retryable(reason) => {
                        let reason = format!("{reason} (gave up after {delivered} deliveries)");
                        give_up(&res, stage, &task, &subject, &reason, delivered, &payload).await;
                        let _ = acker.ack_with(AckKind::Term).await;
                    }
                    StageError::Permanent(reason) => {
                        give_up(&res, stage, &task, &subject, &reason, delivered, &payload).await;
                        let _ = acker.ack_with(AckKind::Term).await;
                    }
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// A task's message while this replica holds it: a heartbeat keeps it ours, and each way of
/// letting it go stops the heartbeat first.
struct Held<'a> {
    acker: &'a jetstream::message::Acker,
    heartbeat: tokio::task::AbortHandle,
}

impl Held<'_> {
    /// Redelivery after the backoff for this delivery.
    async fn retry_later(&self, delivered: u64) {
        self.heartbeat.abort();
        let _ = self
            .acker
            .ack_with(AckKind::Nak(Some(backoff(delivered))))
            .await;
    }

    /// Done: acked, and the ack confirmed.
    async fn done(&self) -> Result<(), async_nats::Error> {
        self.heartbeat.abort();
        self.acker.double_ack().await
    }
}

/// Success: store, record, hand on, ack.
async fn finish(
    res: &Resources,
    task: &StageTask,
    out: StageOutput,
    started: u64,
    held: &Held<'_>,
    delivered: u64,
    span: &tracing::Span,
) {
    let (job, stage) = (task.job_id, task.stage);
    let store = tracing::info_span!("store artifact");
    let artifact = match &out.artifact {
        Some(bytes) => {
            let name = names::artifact_name(job, task.step, stage);
            match res.artifacts.put(&name, bytes).instrument(store).await {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot store the artifact; retrying later");
                    held.retry_later(delivered).await;
                    return;
                }
            }
        }
        None => None,
    };
    for (k, v) in &out.metrics {
        span.set_attribute(format!("lathe.{k}"), *v);
    }
    let finished = now_ms();
    let last = task.step as usize + 1 >= task.spec.pipeline.len();
    let service = stage.service_name().to_string();
    let recorded = res
        .jobs
        .update(job, |r| {
            if let Some(s) = r.steps.get_mut(task.step as usize) {
                s.state = StepState::Completed;
                s.finished_at_ms = Some(finished);
                s.metrics = out.metrics.clone();
                s.details = out.details.clone();
                s.artifact = artifact.clone().or(task.input.clone());
                s.progress = None;
            }
            r.spans.push(lathe_proto::SpanTiming {
                name: format!("process lathe.work.{stage}"),
                service: service.clone(),
                stage: Some(stage),
                start_unix_ms: started,
                end_unix_ms: finished,
            });
            if last {
                r.state = JobState::Completed;
                r.finished_at_ms = Some(finished);
            }
            Change::Write
        })
        .await;
    if let Err(e) = recorded {
        tracing::warn!(error = %e, "Cannot record the result; retrying later");
        held.retry_later(delivered).await;
        return;
    }
    res.events
        .emit(
            EventBuilder::new(job, EventKind::StageCompleted, format!("{stage} completed"))
                .step(task.step, stage)
                .metrics(out.metrics.clone()),
        )
        .await;
    if last {
        trace::end_job_root(job, &task.spec.name, task.accepted_at_ms, None);
        res.events
            .emit(EventBuilder::new(
                job,
                EventKind::Completed,
                "job completed",
            ))
            .await;
        tracing::info!("Job completed");
    } else if hand_on(res, task, artifact.or(task.input.clone()), span)
        .await
        .is_err()
    {
        held.retry_later(delivered).await;
        return;
    }
    if let Err(e) = held.done().await {
        tracing::warn!(error = %e, "Ack not confirmed; a redelivery will find the step completed");
    }
    tracing::info!(
        seconds = (finished - started) as f64 / 1000.0,
        "Task completed"
    );
}

/// Publishes the next stage's task. Idempotent: the stream drops a duplicate `Nats-Msg-Id`.
async fn hand_on(
    res: &Resources,
    task: &StageTask,
    input: Option<ArtifactRef>,
    span: &tracing::Span,
) -> Result<(), ()> {
    let next_step = task.step + 1;
    let Some(next_stage) = task.spec.pipeline.get(next_step as usize).copied() else {
        return Ok(());
    };
    // This stage's events go into the stream before the next stage's.
    res.events.flush().await;
    let next = StageTask {
        schema_version: lathe_proto::SCHEMA_VERSION,
        job_id: task.job_id,
        step: next_step,
        stage: next_stage,
        spec: task.spec.clone(),
        input,
        accepted_at_ms: task.accepted_at_ms,
    };
    publish_task(res, &next, span).await.map_err(|e| {
        tracing::warn!(error = %e, "Cannot publish the next task");
    })
}

/// Publishes a task with its dedupe id and trace context, waiting for the stream's ack.
pub async fn publish_task(
    res: &Resources,
    task: &StageTask,
    parent: &tracing::Span,
) -> Result<(), RuntimeError> {
    let subject = names::work_subject(task.stage);
    let span = tracing::info_span!(
        parent: parent,
        "publish",
        otel.name = %format!("publish {subject}"),
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.destination.name = %subject,
        messaging.operation.type = "publish",
        messaging.message.id = %names::task_msg_id(task.job_id, task.step),
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        "Nats-Msg-Id",
        names::task_msg_id(task.job_id, task.step).as_str(),
    );
    headers.insert(names::CONTENT_TYPE_HEADER, codec::MSGPACK);
    trace::inject(&span.context(), &mut headers);
    crate::publish::publish_acked(
        &res.js,
        &subject,
        headers,
        codec::to_msgpack(task).into(),
        crate::publish::PATIENCE,
    )
    .instrument(span)
    .await
}

/// The task will not be retried: fail the job and keep the task where operators look, under
/// `stage`, the work subject's (a misrouted task names another).
#[allow(clippy::too_many_arguments)]
async fn give_up(
    res: &Resources,
    stage: Stage,
    task: &StageTask,
    subject: &str,
    reason: &str,
    delivered: u64,
    payload: &[u8],
) {
    tracing::error!(stage = stage.as_str(), %subject, %reason, "Task failed for good; job failed");
    fail_job(res, task, reason).await;
    dead_letter(
        res,
        stage.as_str(),
        subject,
        Some(task.job_id),
        Some(task.step),
        reason,
        delivered,
        payload,
    )
    .await;
}

/// Marks the job (and the task's step) failed with a reason, and says so in events.
pub(crate) async fn fail_job(res: &Resources, task: &StageTask, reason: &str) {
    let error = format!("{} failed: {reason}", task.stage);
    match res
        .jobs
        .fail(task.job_id, &error, Some((task.step, reason)))
        .await
    {
        Err(e) => tracing::warn!(job = %task.job_id, error = %e, "Cannot mark the job failed"),
        Ok(Some(_)) => trace::end_job_root(
            task.job_id,
            &task.spec.name,
            task.accepted_at_ms,
            Some(reason),
        ),
        Ok(None) => {}
    }
    res.events
        .emit(
            EventBuilder::new(task.job_id, EventKind::StageFailed, reason.to_string())
                .step(task.step, task.stage),
        )
        .await;
    res.events
        .emit(EventBuilder::new(task.job_id, EventKind::Failed, error))
        .await;
}

/// Copies a message to `lathe.dead.<stage>`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn dead_letter(
    res: &Resources,
    stage: &str,
    subject: &str,
    job: Option<JobId>,
    step: Option<u32>,
    reason: &str,
    deliveries: u64,
    payload: &[u8],
) {
    let letter = DeadLetter {
        schema_version: lathe_proto::SCHEMA_VERSION,
        subject: subject.to_string(),
        job_id: job,
        step,
        reason: reason.to_string(),
        deliveries,
        at_ms: now_ms(),
        payload: payload.to_vec(),
    };
    match res
        .js
        .publish(
            names::dead_subject(stage),
            codec::to_msgpack(&letter).into(),
        )
        .await
    {
        Ok(ack) => {
            if let Err(e) = ack.await {
                tracing::error!(error = %e, "Dead letter not stored");
            }
        }
        Err(e) => tracing::error!(error = %e, "Dead letter not published"),
    }
}

/// Retry delay after `delivered` deliveries: 1 s, 2 s, 4 s … capped at 30 s.
pub(crate) fn backoff(delivered: u64) -> Duration {
    Duration::from_secs(1u64 << delivered.saturating_sub(1).min(5)).min(Duration::from_secs(30))
}

/// The server's advisory when a task ran out of deliveries without an ack or a term (e.g.
/// its worker was killed each time). One replica per stage (queue group) takes it, fails
/// the job, dead-letters the task and removes it from the work stream.
async fn watch_max_deliveries(res: Resources, stage: Stage, shutdown: CancellationToken) {
    let subject = format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
        names::WORK_STREAM,
        names::stage_consumer(stage)
    );
    let mut sub = match res
        .client
        .queue_subscribe(subject, format!("advisory-{stage}"))
        .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot watch max-delivery advisories");
            return;
        }
    };
    #[derive(serde::Deserialize)]
    struct Advisory {
        stream_seq: u64,
        deliveries: u64,
    }
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return },
            _ = shutdown.cancelled() => return,
        };
        let Ok(adv) = serde_json::from_slice::<Advisory>(&msg.payload) else {
            continue;
        };
        let Ok(stream) = res.js.get_stream(names::WORK_STREAM).await else {
            continue;
        };
        let Ok(raw) = stream.get_raw_message(adv.stream_seq).await else {
            continue;
        };
        let reason = format!(
            "no worker finished the task in {} deliveries",
            adv.deliveries
        );
        match codec::from_msgpack::<StageTask>(&raw.payload) {
            Ok(task) => {
                tracing::error!(job = %task.job_id, %reason, "Task exhausted its deliveries");
                fail_job(&res, &task, &reason).await;
                dead_letter(
                    &res,
                    stage.as_str(),
                    &raw.subject,
                    Some(task.job_id),
                    Some(task.step),
                    &reason,
                    adv.deliveries,
                    &raw.payload,
                )
                .await;
            }
            Err(_) => {
                dead_letter(
                    &res,
                    stage.as_str(),
                    &raw.subject,
                    None,
                    None,
                    &reason,
                    adv.deliveries,
                    &raw.payload,
                )
                .await;
            }
        }
        let _ = stream.delete_message(adv.stream_seq).await;
    }
}
