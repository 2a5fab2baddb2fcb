//! Every message other than the job spec: what services hand each other (stage task,
//! artifact reference), what they record (job record, job event, dead letter) and what the
//! serving side speaks (inference request/reply, telemetry, feedback, alert).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

use crate::ids::{JobId, ModelName, Stage};
use crate::spec::{FieldError, JobSpec};

fn v1() -> u32 {
    crate::SCHEMA_VERSION
}

/// Where a model artifact lives and what its bytes must hash to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ArtifactRef {
    /// The object store bucket (`lathe-artifacts`).
    pub bucket: String,
    /// The object's name, `<job>/<step>-<stage>`.
    pub name: String,
    /// `SHA-256=<base64url>` of the bytes, as the NATS object store records it; checked on read.
    pub digest: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// One unit of work for a stage, published on `lathe.work.<stage>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StageTask {
    #[serde(default = "v1")]
    pub schema_version: u32,
    pub job_id: JobId,
    /// Index of this stage in `spec.pipeline`.
    pub step: u32,
    pub stage: Stage,
    /// The whole (validated) spec, so that a stage needs no other lookup to start.
    pub spec: JobSpec,
    /// The previous stage's artifact; absent for the first stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<ArtifactRef>,
    /// When the job was accepted, for the whole-job wall time.
    pub accepted_at_ms: u64,
}

impl StageTask {
    /// Checks what a worker relies on before it starts: a schema it reads, a spec that passes
    /// every rule intake applies (its errors named under `spec.`), and a step that names this
    /// task's stage in the spec's pipeline. Intake publishes only valid tasks; this catches one
    /// published by hand or altered on the way.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = Vec::new();
        if self.schema_version == 0 || self.schema_version > crate::SCHEMA_VERSION {
            errs.push(FieldError::new(
                "schema_version",
                format!(
                    "must be in 1..={}, got {}",
                    crate::SCHEMA_VERSION,
                    self.schema_version
                ),
            ));
        }
        if let Err(spec_errs) = self.spec.validate() {
            errs.extend(spec_errs.into_iter().map(|e| {
                let field = if e.field == "." {
                    "spec".to_string()
                } else {
                    format!("spec.{}", e.field)
                };
                FieldError::new(field, e.reason)
            }));
        }
        match self.spec.pipeline.get(self.step as usize) {
            Some(s) if *s == self.stage => {}
            Some(s) => errs.push(FieldError::new(
                "step",
                format!(
                    "step {} of the pipeline is `{s}`, not this task's `{}`",
                    self.step, self.stage
                ),
            )),
            None => errs.push(FieldError::new(
                "step",
                format!(
                    "step {} is past the pipeline's {} stages",
                    self.step,
                    self.spec.pipeline.len()
                ),
            )),
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }
}

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted; the first task is queued.
    Queued,
    /// A stage is working on it.
    Running,
    Completed,
    Failed,
    /// The spec was invalid; `errors` says why.
    Rejected,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Rejected
        )
    }
}

/// Where one step of a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Completed,
    Failed,
}

/// Per-epoch (or per-step) progress of a stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Progress {
    /// 1-based.
    pub epoch: u32,
    pub epochs: u32,
    /// e.g. `train_loss`, `validation_accuracy`.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// One step of a job as recorded in its job record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepRecord {
    pub step: u32,
    pub stage: Stage,
    pub state: StepState,
    /// Deliveries of this step's task that started work (a redelivery after a crash adds one).
    #[serde(default)]
    pub attempts: u32,
    /// The worker (host and process) that did the last attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// The stage's figures: accuracy, parameter count, artifact bytes, seconds …
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Anything the stage reports that is not a number (e.g. the per-class evaluation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    /// The artifact this step wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// A finished span's timing, kept in the job record so a terminal can draw the waterfall
/// without a tracing backend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SpanTiming {
    pub name: String,
    /// The service that recorded it.
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
}

/// The state of a job, in the `lathe-jobs` bucket under its id. Changed only by
/// compare-and-set on the KV revision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobRecord {
    #[serde(default = "v1")]
    pub schema_version: u32,
    pub job_id: JobId,
    pub name: String,
    pub state: JobState,
    /// The validated spec (absent when it was rejected before it could be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<JobSpec>,
    /// Every invalid field of a rejected spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// Why the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub submitted_at_ms: u64,
    pub updated_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    #[serde(default)]
    pub steps: Vec<StepRecord>,
    #[serde(default)]
    pub spans: Vec<SpanTiming>,
}

impl JobRecord {
    /// The record of a spec refused at intake, ended at `at_ms`: `errors` names every
    /// invalid field, and the job's error sums them up.
    pub fn rejected(job_id: JobId, name: String, errors: Vec<FieldError>, at_ms: u64) -> Self {
        let summary = errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        JobRecord {
            schema_version: crate::SCHEMA_VERSION,
            job_id,
            name,
            state: JobState::Rejected,
            spec: None,
            errors,
            error: Some(format!("invalid spec: {summary}")),
            submitted_at_ms: at_ms,
            updated_at_ms: at_ms,
            finished_at_ms: Some(at_ms),
            steps: vec![],
            spans: vec![],
        }
    }
}

/// What happened to a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Accepted,
    Rejected,
    StageStarted,
    Progress,
    StageCompleted,
    StageFailed,
    StageRetry,
    Completed,
    Failed,
    /// The monitor raised an alert about the model this job deployed.
    Alert,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Rejected => "rejected",
            EventKind::StageStarted => "stage_started",
            EventKind::Progress => "progress",
            EventKind::StageCompleted => "stage_completed",
            EventKind::StageFailed => "stage_failed",
            EventKind::StageRetry => "stage_retry",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
            EventKind::Alert => "alert",
        }
    }

    /// Whether the job ends with this event.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventKind::Rejected | EventKind::Completed | EventKind::Failed
        )
    }
}

/// A job lifecycle event on `lathe.events.<job>.<kind>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobEvent {
    #[serde(default = "v1")]
    pub schema_version: u32,
    pub job_id: JobId,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    pub at_ms: u64,
    /// One human sentence.
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// A message that could not be processed, copied to `lathe.dead.<stage>` before it was
/// removed from its stream, so that it can be seen and replayed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeadLetter {
    #[serde(default = "v1")]
    pub schema_version: u32,
    /// The subject the message was published on.
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    pub reason: String,
    /// How many times it was delivered.
    pub deliveries: u64,
    pub at_ms: u64,
    /// The original payload, byte for byte.
    #[schemars(with = "Vec<u8>")]
    #[serde(with = "serde_bytes_compat")]
    pub payload: Vec<u8>,
}

/// Bytes as a MessagePack bin (compact) that still read back from a JSON array.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }
}

/// The features of one request: one row or a batch of rows, as raw (unscaled) numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum InferInputs {
    Row(Vec<f64>),
    Batch(Vec<Vec<f64>>),
}

/// A request on `lathe.infer.<model>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    #[serde(default = "v1")]
    pub schema_version: u32,
    /// The caller's id for this request, echoed back and used by feedback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub inputs: InferInputs,
}

/// One row's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RowPrediction {
    /// Index of the predicted class.
    pub class: u32,
    /// The class's label as the dataset spelled it.
    pub label: String,
    /// Probability of every class, in class order.
    pub probabilities: Vec<f32>,
}

/// The reply to an inference request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InferReply {
    #[serde(default = "v1")]
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub model: ModelName,
    /// The registry version that answered.
    pub version: u32,
    pub predictions: Vec<RowPrediction>,
}

/// One served request, sent by the deployer on `lathe.telemetry.<model>` for the monitor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TelemetryRecord {
    #[serde(default = "v1")]
    pub schema_version: u32,
    pub model: ModelName,
    pub version: u32,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Server-side latency of the request, microseconds.
    pub latency_us: u64,
    pub rows: u32,
    /// Predicted class per row.
    #[serde(default)]
    pub predicted: Vec<u32>,
    /// Set when the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A sample of the raw input rows, for drift checks. Every value is finite (the engine
    /// serves no other): a record with a non-finite one is refused when decoded.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "finite_rows"
    )]
    pub sampled_inputs: Vec<Vec<f32>>,
}

/// Rows of `f32` values, refusing a non-finite one: a corrupted MessagePack float can decode
/// to infinity or NaN, which no served request carries and drift statistics cannot use.
fn finite_rows<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f32>>, D::Error> {
    let rows = Vec::<Vec<f32>>::deserialize(d)?;
    for (i, row) in rows.iter().enumerate() {
        if let Some(j) = row.iter().position(|v| !v.is_finite()) {
            return Err(serde::de::Error::custom(format!(
                "sampled_inputs[{i}][{j}] is {}, not a finite number",
                row[j]
            )));
        }
    }
    Ok(rows)
}

/// Telemetry records a replica sends together on `lathe.telemetry.<model>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TelemetryBatch {
    #[serde(default = "v1")]
    pub schema_version: u32,
    pub model: ModelName,
    /// The replica that served them.
    pub replica: String,
    pub records: Vec<TelemetryRecord>,
}

/// Ground truth sent after the fact on `lathe.feedback.<model>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    #[serde(default = "v1")]
    pub schema_version: u32,
    /// The `id` of the inference request.
    pub request_id: String,
    /// The true label of each row, as the dataset spells labels.
    pub labels: Vec<String>,
}

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    Latency,
    ErrorRate,
    Accuracy,
    FeatureDrift,
    PredictionDrift,
    Rollback,
    Promotion,
}

/// A breached policy, on `lathe.alerts.<model>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Alert {
    #[serde(default = "v1")]
    pub schema_version: u32,
    pub model: ModelName,
    pub version: u32,
    pub kind: AlertKind,
    /// The measured figure.
    pub figure: f64,
    /// The policy's threshold.
    pub threshold: f64,
    pub window_secs: u32,
    pub at_ms: u64,
    pub message: String,
    /// The drifted features, for drift alerts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}
