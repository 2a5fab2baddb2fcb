//! Job intake: every spec published to `lathe.jobs.submit` (JSON or MessagePack) is read from
//! the durable submit stream, validated, and turned into a job record, an `accepted` event
//! and the first stage's task — or into a `rejected` record and event naming every bad field.
//!
//! Every service runs intake on the one shared `intake` consumer, so a spec published while
//! nothing runs is processed as soon as any service starts, and exactly once.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use lathe_proto::codec::Format;
use lathe_proto::{
    EventKind, FieldError, JobId, JobRecord, JobSpec, JobState, StageTask, StepRecord, StepState,
    names, now_ms,
};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::error::RuntimeError;
use crate::events::EventBuilder;
use crate::provision::{INTAKE_MAX_DELIVER, Resources};
use crate::{trace, worker};

/// Runs intake until `shutdown` is cancelled.
pub async fn run_intake(
    res: Resources,
    service: &'static str,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let consumer: consumer::PullConsumer = res
        .js
        .get_consumer_from_stream(names::INTAKE_CONSUMER, names::SUBMIT_STREAM)
        .await
        .map_err(|e| RuntimeError::nats("get intake consumer", e))?;
    loop {
        let fetched = tokio::select! {
            f = consumer.fetch().max_messages(16).expires(Duration::from_secs(5)).messages() => f,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let mut batch = match fetched {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "Intake pull failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(msg) = tokio::select! {
            m = batch.next() => m,
            _ = shutdown.cancelled() => None,
        } {
            let Ok(msg) = msg else { continue };
            if let Err(e) = intake_one(&res, service, &msg).await {
                let delivered = msg.info().map(|i| i.delivered).unwrap_or(1).max(1) as u64;
                if delivered >= INTAKE_MAX_DELIVER as u64 {
                    give_up(&res, &msg, delivered, &e).await;
                    let _ = msg.ack_with(AckKind::Term).await;
                } else {
                    // Backing off spans a cluster's leader election (several seconds) within
                    // the consumer's deliveries.
                    tracing::warn!(error = %e, delivery = delivered, "Submission not processed; it will be redelivered");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(worker::backoff(delivered))))
                        .await;
                }
            } else if let Err(e) = msg.double_ack().await {
                tracing::warn!(error = %e, "Submission ack not confirmed");
            }
        }
    }
}

/// The submission's last delivery failed too: a job whose record exists is failed with the
/// reason, so that no job stays queued forever; the submission goes to the dead letters.
async fn give_up(res: &Resources, msg: &jetstream::Message, delivered: u64, e: &RuntimeError) {
    let reason = format!("intake could not queue the job after {delivered} deliveries: {e}");
    tracing::error!(%reason, "Submission given up");
    let job = job_id_of(msg).ok();
    if let Some(job) = job
        && let Ok(Some(record)) = res.jobs.fail(job, &reason, None).await
    {
        trace::end_job_root(job, &record.name, record.submitted_at_ms, Some(&reason));
        res.events
            .emit(EventBuilder::new(job, EventKind::Failed, reason.clone()))
            .await;
    }
    worker::dead_letter(
        res,
        "intake",
        names::SUBMIT_SUBJECT,
        job,
        None,
        &reason,
        delivered,
        &msg.payload,
    )
    .await;
}

/// The job id of a submission: the `lathe-job-id` header when the submitter chose one, else
/// derived from the message's place in the stream, so a redelivery maps to the same job.
fn job_id_of(msg: &jetstream::Message) -> Result<JobId, FieldError> {
    if let Some(v) = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(names::JOB_ID_HEADER))
    {
        return v
            .as_str()
            .parse::<JobId>()
            .map_err(|e| FieldError::new(format!("header {}", names::JOB_ID_HEADER), e));
    }
    let (seq, published) = match msg.info() {
        Ok(i) => (i.stream_sequence, i.published.unix_timestamp_nanos()),
        Err(_) => (0, 0),
    };
    let digest = Sha256::digest(format!("{}:{seq}:{published}", names::SUBMIT_STREAM));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Ok(JobId(uuid::Uuid::new_v8(bytes)))
}

/// The name of a rejected spec, when it has a readable one.
fn best_effort_name(payload: &[u8], format: Format) -> String {
    let value: Option<serde_json::Value> = match format {
        Format::Json => serde_json::from_slice(payload).ok(),
        Format::MsgPack => lathe_proto::codec::decode(payload, Format::MsgPack).ok(),
    };
    value
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .unwrap_or_else(|| "(unnamed)".into())
}

async fn intake_one(
    res: &Resources,
    service: &'static str,
    msg: &jetstream::Message,
) -> Result<(), RuntimeError> {
    let content_type = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(names::CONTENT_TYPE_HEADER))
        .map(|v| v.as_str().to_string());
    let format = Format::sniff(&msg.payload, content_type.as_deref());
    let received_ms = now_ms();
    let job = match job_id_of(msg) {
        Ok(j) => j,
        Err(e) => {
            // Without a usable id there is no record to write: keep the submission visible.
            worker::dead_letter(
                res,
                "intake",
                names::SUBMIT_SUBJECT,
                None,
                None,
                &e.to_string(),
                1,
                &msg.payload,
            )
            .await;
            return Ok(());
        }
    };
    let parsed = JobSpec::parse(&msg.payload, format);
    let name = match &parsed {
        Ok(s) => s.name.clone(),
        Err(_) => best_effort_name(&msg.payload, format),
    };
    let span = tracing::info_span!("intake", otel.name = "process lathe.jobs.submit", otel.kind = "consumer",
        messaging.system = "nats", messaging.destination.name = names::SUBMIT_SUBJECT,
        messaging.operation.type = "process", lathe.job.id = %job, trace_id = %job.trace_id_hex(), span_id = tracing::field::Empty);
    let _ = span.set_parent(trace::job_root_context(job));
    trace::record_span_id(&span);
    async {
        match parsed {
            Ok(spec) => {
                accept(
                    res,
                    job,
                    spec,
                    service,
                    received_ms,
                    &tracing::Span::current(),
                )
                .await
            }
            Err(errors) => reject(res, job, name, errors).await,
        }
    }
    .instrument(span)
    .await
}

async fn accept(
    res: &Resources,
    job: JobId,
    spec: JobSpec,
    service: &str,
    received_ms: u64,
    span: &tracing::Span,
) -> Result<(), RuntimeError> {
    let now = now_ms();
    let record = JobRecord {
        schema_version: lathe_proto::SCHEMA_VERSION,
        job_id: job,
        name: spec.name.clone(),
        state: JobState::Queued,
        spec: Some(spec.clone()),
        errors: vec![],
        error: None,
        submitted_at_ms: received_ms,
        updated_at_ms: now,
        finished_at_ms: None,
        spans: vec![lathe_proto::SpanTiming {
            name: "process lathe.jobs.submit".into(),
            service: service.to_string(),
            stage: None,
            start_unix_ms: received_ms,
            end_unix_ms: now,
        }],
        steps: spec
            .pipeline
            .iter()
            .enumerate()
            .map(|(i, s)| StepRecord {
                step: i as u32,
                stage: *s,
                state: StepState::Pending,
                attempts: 0,
                worker: None,
                started_at_ms: None,
                finished_at_ms: None,
                metrics: Default::default(),
                details: None,
                artifact: None,
                error: None,
                progress: None,
            })
            .collect(),
    };
    let accepted_at = match res.jobs.create(&record).await? {
        true => {
            res.events
                .emit(EventBuilder::new(
                    job,
                    EventKind::Accepted,
                    format!("job `{}` accepted: {}", spec.name, pipeline_text(&spec)),
                ))
                .await;
            tracing::info!(%job, name = %spec.name, "Job accepted");
            received_ms
        }
        // A redelivered submission: the record exists, so only make sure the first task is
        // queued (the stream drops the duplicate).
        false => match res.jobs.get(job).await? {
            Some((r, _)) if r.state == JobState::Queued => r.submitted_at_ms,
            _ => return Ok(()),
        },
    };
    let first = StageTask {
        schema_version: lathe_proto::SCHEMA_VERSION,
        job_id: job,
        step: 0,
        stage: spec.pipeline[0],
        spec,
        input: None,
        accepted_at_ms: accepted_at,
    };
    // `accepted` goes before the first stage's events.
    res.events.flush().await;
    worker::publish_task(res, &first, span).await
}

fn pipeline_text(spec: &JobSpec) -> String {
    spec.pipeline
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" → ")
}

async fn reject(
    res: &Resources,
    job: JobId,
    name: String,
    errors: Vec<FieldError>,
) -> Result<(), RuntimeError> {
    let now = now_ms();
    let record = JobRecord::rejected(job, name, errors, now);
    if res.jobs.create(&record).await? {
        let error = record.error.clone().unwrap_or_default();
        tracing::info!(%job, %error, "Job rejected");
        trace::end_job_root(job, &record.name, now, Some(&error));
        res.events
            .emit(EventBuilder::new(job, EventKind::Rejected, error).errors(record.errors))
            .await;
    }
    Ok(())
}
