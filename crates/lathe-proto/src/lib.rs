//! lathe's wire contract: every message that crosses NATS, the subject, stream, consumer and
//! bucket names, and the codec that turns them into bytes.
//!
//! Modules:
//! - [`ids`]: validated identifiers parsed once at the boundary (`JobId`, `ModelName`, `Stage`).
//! - [`names`]: every subject, stream, consumer and bucket name in one place.
//! - [`spec`]: the job spec a user publishes, with its defaults and its validation.
//! - [`messages`]: every other message (stage task, job record, event, artifact reference,
//!   inference request/reply, telemetry, feedback, alert, dead letter).
//! - [`oip`]: the Open Inference Protocol (KServe v2) request and response shapes.
//! - [`registry`]: the model registry entry and the rules of promotion and rollback.
//! - [`health`]: the monitor's per-model health figures.
//! - [`codec`]: MessagePack with named fields between services, JSON where a person publishes.
//! - [`schema`]: the JSON Schema of every message, as written to `proto/schemas/`.
//!
//! **Invariant:** this crate knows no transport and no model: it is types, names and bytes.

pub mod codec;
pub mod health;
pub mod ids;
pub mod messages;
pub mod names;
pub mod oip;
pub mod registry;
pub mod schema;
pub mod spec;

pub use codec::{DecodeError, Format};
pub use ids::{JobId, ModelName, Stage};
pub use messages::*;
pub use spec::{FieldError, JobSpec};

/// The schema version every message of this build writes and the newest it reads.
pub const SCHEMA_VERSION: u32 = 1;

/// Milliseconds since the Unix epoch, the one time unit used on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
