//! NATS plumbing shared by every lathe service, written once so that each stage is only its
//! own algorithm.
//!
//! Modules:
//! - [`settings`]: connection and worker settings from the environment (`NATS_URL`, auth, TLS,
//!   `LATHE_*`), and [`settings::connect`].
//! - [`provision`]: idempotent creation of every stream, consumer, KV bucket and object store;
//!   [`provision::Resources`] hands them to the rest.
//! - [`jobs`]: job records in the `lathe-jobs` bucket, changed only by compare-and-set.
//! - [`kv_scan`]: every current value of a KV bucket in one pass.
//! - [`events`]: job events on `lathe.events.<job>.<kind>`.
//! - [`artifacts`]: model artifacts and datasets in object stores, digests checked on read.
//! - [`dataset`]: the job's train/validation/test splits from its spec, for every stage.
//! - [`trace`]: W3C trace context in NATS headers, and telemetry set-up (logs and OTLP).
//! - [`worker`]: the stage worker loop every service runs.
//! - [`health`]: `/livez` and `/readyz` for orchestrators (`LATHE_HEALTH_ADDR`).
//! - [`registry`]: the model registry (`lathe-models`), changed only by compare-and-set.
//! - [`intake`]: validation of submitted specs into job records and first tasks.
//! - [`shutdown`]: SIGTERM/SIGINT into a cancellation token.
//!
//! **Invariant:** only this crate talks JetStream; services implement [`worker::StageHandler`]
//! and never publish work themselves.

pub mod artifacts;
pub mod dataset;
pub mod error;
pub mod events;
pub mod health;
pub mod intake;
pub mod jobs;
pub mod kv_scan;
pub mod provision;
pub mod publish;
pub mod registry;
pub mod service;
pub mod settings;
pub mod shutdown;
pub mod trace;
pub mod worker;

pub use error::RuntimeError;
pub use provision::Resources;
pub use settings::{NatsSettings, WorkerSettings};
pub use worker::{StageError, StageHandler, StageOutput, TaskContext};

/// A name for this process in job records and logs: host and pid.
pub fn worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}
