//! Job events on `lathe.events.<job>.<kind>`, stored in the `LATHE_EVENTS` stream so a
//! watcher that starts late still sees the whole history.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use async_nats::jetstream;
use lathe_proto::{EventKind, FieldError, JobEvent, JobId, Progress, Stage, codec, names, now_ms};

#[derive(Clone)]
pub struct Events {
    js: jetstream::Context,
}

/// An event under construction.
pub struct EventBuilder {
    event: JobEvent,
}

impl EventBuilder {
    pub fn new(job: JobId, kind: EventKind, message: impl Into<String>) -> Self {
        EventBuilder {
            event: JobEvent {
                schema_version: lathe_proto::SCHEMA_VERSION,
                job_id: job,
                kind,
                step: None,
                stage: None,
                at_ms: now_ms(),
                message: message.into(),
                progress: None,
                metrics: BTreeMap::new(),
                errors: Vec::new(),
            },
        }
    }
    pub fn step(mut self, step: u32, stage: Stage) -> Self {
        self.event.step = Some(step);
        self.event.stage = Some(stage);
        self
    }
    pub fn progress(mut self, p: Progress) -> Self {
        self.event.progress = Some(p);
        self
    }
    pub fn metrics(mut self, m: BTreeMap<String, f64>) -> Self {
        self.event.metrics = m;
        self
    }
    pub fn errors(mut self, e: Vec<FieldError>) -> Self {
        self.event.errors = e;
        self
    }
    pub fn build(self) -> JobEvent {
        self.event
    }
}

impl Events {
    pub fn new(js: jetstream::Context) -> Self {
        Events { js }
    }

    /// Publishes an event. Events are for watchers: a failure to publish one is logged, and
    /// never fails the job. A job's last event (completed, failed, rejected), which a watcher
    /// waits for, is published patiently and once ([`crate::publish`]); the others are tried
    /// once.
    pub async fn emit(&self, event: EventBuilder) {
        let event = event.build();
        let subject = names::event_subject(event.job_id, event.kind.as_str());
        let mut headers = HeaderMap::new();
        let patience = if event.kind.is_terminal() {
            let id = format!("{}.{}", event.job_id, event.kind.as_str());
            headers.insert("Nats-Msg-Id", id.as_str());
            crate::publish::PATIENCE
        } else {
            std::time::Duration::ZERO
        };
        let stored = crate::publish::publish_acked(
            &self.js,
            &subject,
            headers,
            codec::to_msgpack(&event).into(),
            patience,
        )
        .await;
        if let Err(e) = stored {
            tracing::warn!(job = %event.job_id, kind = event.kind.as_str(), error = %e, "Event not stored");
        }
    }
}
