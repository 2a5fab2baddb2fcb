//! The JSON Schema of every message, generated from the Rust types. `proto/schemas/` holds
//! the same schemas for other languages; a test regenerates them and fails on any difference
//! (`UPDATE_SCHEMAS=1 cargo test -p lathe-proto` rewrites them after a deliberate change).

use schemars::{JsonSchema, generate::SchemaSettings};

use crate::health::ModelHealth;
use crate::messages::*;
use crate::oip::{OipRequest, OipResponse};
use crate::registry::ModelEntry;
use crate::spec::JobSpec;

fn schema_of<T: JsonSchema>() -> serde_json::Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    serde_json::to_value(generator.into_root_schema_for::<T>()).expect("a schema is JSON")
}

/// Every message's schema, as `(file name, pretty JSON)`, in a fixed order.
pub fn all() -> Vec<(&'static str, String)> {
    let entries: Vec<(&'static str, serde_json::Value)> = vec![
        ("job-spec.schema.json", schema_of::<JobSpec>()),
        ("stage-task.schema.json", schema_of::<StageTask>()),
        ("artifact-ref.schema.json", schema_of::<ArtifactRef>()),
        ("job-record.schema.json", schema_of::<JobRecord>()),
        ("job-event.schema.json", schema_of::<JobEvent>()),
        ("dead-letter.schema.json", schema_of::<DeadLetter>()),
        ("infer-request.schema.json", schema_of::<InferRequest>()),
        ("infer-reply.schema.json", schema_of::<InferReply>()),
        (
            "telemetry-record.schema.json",
            schema_of::<TelemetryRecord>(),
        ),
        ("telemetry-batch.schema.json", schema_of::<TelemetryBatch>()),
        ("feedback.schema.json", schema_of::<Feedback>()),
        ("model-entry.schema.json", schema_of::<ModelEntry>()),
        ("model-health.schema.json", schema_of::<ModelHealth>()),
        ("oip-request.schema.json", schema_of::<OipRequest>()),
        ("oip-response.schema.json", schema_of::<OipResponse>()),
        ("alert.schema.json", schema_of::<Alert>()),
    ];
    entries
        .into_iter()
        .map(|(name, v)| {
            let mut text = serde_json::to_string_pretty(&v).expect("a schema is JSON");
            text.push('\n');
            (name, text)
        })
        .collect()
}
