//! Every subject, stream, consumer and bucket name lathe uses, so that no other crate spells
//! one by hand. `proto/subjects.md` documents the same names for other languages.

use crate::ids::{JobId, ModelName, Stage};

/// Where users publish job specs (JSON or MessagePack).
pub const SUBMIT_SUBJECT: &str = "lathe.jobs.submit";
/// The durable intake stream: a spec published while no service runs waits here.
pub const SUBMIT_STREAM: &str = "LATHE_SUBMIT";
/// The one durable consumer of the submit stream, shared by every service that runs intake.
pub const INTAKE_CONSUMER: &str = "intake";

/// The work-queue stream holding every stage's tasks.
pub const WORK_STREAM: &str = "LATHE_WORK";
/// Every stage's work subjects.
pub const WORK_SUBJECTS: &str = "lathe.work.*";

/// Job lifecycle events, kept for watchers (limits retention).
pub const EVENTS_STREAM: &str = "LATHE_EVENTS";
pub const EVENTS_SUBJECTS: &str = "lathe.events.>";

/// Tasks that could not be processed, kept so that an operator can see and replay them.
pub const DEAD_STREAM: &str = "LATHE_DEAD";
pub const DEAD_SUBJECTS: &str = "lathe.dead.>";

/// Alerts, kept (deduplicated by `Nats-Msg-Id`) for operators and `lathe monitor`.
pub const ALERTS_STREAM: &str = "LATHE_ALERTS";
pub const ALERTS_SUBJECTS: &str = "lathe.alerts.>";

/// Job records, keyed by job id.
pub const JOBS_BUCKET: &str = "lathe-jobs";
/// The model registry, keyed by model name.
pub const MODELS_BUCKET: &str = "lathe-models";
/// Model artifacts, named `<job>/<step>-<stage>`.
pub const ARTIFACTS_BUCKET: &str = "lathe-artifacts";
/// The monitor's health figures, keyed by model name.
pub const HEALTH_BUCKET: &str = "lathe-health";
/// Header pinning an inference request to one serving version (the monitor's smoke test).
pub const VERSION_HEADER: &str = "lathe-version";
/// Uploaded datasets, named by the user.
pub const DATASETS_BUCKET: &str = "lathe-datasets";

/// Header carrying the W3C trace context (lowercase: async-nats header names are
/// case-sensitive).
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Header a submitter may set to choose the job id (the CLI does, so it can watch the job).
pub const JOB_ID_HEADER: &str = "lathe-job-id";
/// Header naming the payload's encoding.
pub const CONTENT_TYPE_HEADER: &str = "content-type";

/// The work subject of a stage: `lathe.work.<stage>`.
pub fn work_subject(stage: Stage) -> String {
    format!("lathe.work.{}", stage.as_str())
}

/// The durable pull consumer shared by every replica of a stage.
pub fn stage_consumer(stage: Stage) -> String {
    format!("stage-{}", stage.as_str())
}

/// `Nats-Msg-Id` of a job's task for a step, so a re-published task is dropped by the
/// stream's duplicate window.
pub fn task_msg_id(job: JobId, step: u32) -> String {
    format!("{job}:{step}")
}

/// The subject of one event of a job: `lathe.events.<job>.<kind>`.
pub fn event_subject(job: JobId, kind: &str) -> String {
    format!("lathe.events.{job}.{kind}")
}

/// Every event of one job.
pub fn job_events_filter(job: JobId) -> String {
    format!("lathe.events.{job}.>")
}

/// Where a stage's poison tasks go: `lathe.dead.<stage>`.
pub fn dead_subject(stage: &str) -> String {
    format!("lathe.dead.{stage}")
}

/// The name of the artifact a step writes: `<job>/<step>-<stage>`.
pub fn artifact_name(job: JobId, step: u32, stage: Stage) -> String {
    format!("{job}/{step}-{}", stage.as_str())
}

/// The prefix of every model's inference subject.
pub const INFER_PREFIX: &str = "lathe.infer";
/// Every model's inference subject, as the deployer's endpoint subscribes to it (`>`, so
/// that a malformed model name such as `a.b` gets an error reply, not "no responders").
pub const INFER_SUBJECTS: &str = "lathe.infer.>";
/// Every model's telemetry, as the monitor subscribes to it.
pub const TELEMETRY_SUBJECTS: &str = "lathe.telemetry.*";
/// Every model's feedback.
pub const FEEDBACK_SUBJECTS: &str = "lathe.feedback.*";

/// Inference requests for a model.
pub fn infer_subject(model: &ModelName) -> String {
    format!("lathe.infer.{model}")
}

/// Telemetry records of a model's replies.
pub fn telemetry_subject(model: &ModelName) -> String {
    format!("lathe.telemetry.{model}")
}

/// Ground-truth labels sent after the fact.
pub fn feedback_subject(model: &ModelName) -> String {
    format!("lathe.feedback.{model}")
}

/// Alerts raised by the monitor.
pub fn alerts_subject(model: &ModelName) -> String {
    format!("lathe.alerts.{model}")
}
