//! Job events on `lathe.events.<job>.<kind>`, stored in the `LATHE_EVENTS` stream so a
//! watcher that starts late still sees the whole history.

use std::collections::BTreeMap;

use async_nats::HeaderMap;
use async_nats::jetstream;
use lathe_proto::{EventKind, FieldError, JobEvent, JobId, Progress, Stage, codec, names, now_ms};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

/// This process's job events: a handle to the one task that publishes them in order.
#[derive(Clone)]
pub struct Events {
    queue: mpsc::UnboundedSender<Queued>,
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

/// What the publishing task is handed, in order.
enum Queued {
    /// An event, and for a job's last event whom to tell once it is stored (or given up).
    Event {
        event: JobEvent,
        span: tracing::Span,
        done: Option<oneshot::Sender<()>>,
    },
    /// Told once everything queued before it is stored (or given up).
    Flush(oneshot::Sender<()>),
}

impl Events {
    /// Starts the task that publishes this process's events (call inside a Tokio runtime);
    /// it ends when the last clone of the returned handle is dropped and its queue is empty.
    pub fn new(js: jetstream::Context) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish_in_order(js, rx));
        Events { queue }
    }

    /// Hands an event to this process's publishing task, which stores events in the order
    /// they were emitted. Events are for watchers: a failure to store one is logged and never
    /// fails the job, and emitting never waits for the server, except for a job's last event
    /// (completed, failed, rejected), which a watcher waits for: that call returns once it
    /// and everything emitted before it are stored or given up.
    ///
    /// Every event but progress is published patiently ([`crate::publish::PATIENCE`]), with a
    /// `Nats-Msg-Id` so a retried publish is stored once: while a NATS cluster elects the
    /// events stream's leader it answers "no stream" for seconds, and a stage that finishes in
    /// that window must not lose its `stage_started`/`stage_completed` (an e2e run that killed
    /// a cluster node lost every event of the job that ran next when they were tried once).
    /// Progress events are tried once: the next one supersedes a lost one, and a long outage
    /// must not hold the queue for each of them.
    pub async fn emit(&self, event: EventBuilder) {
        let event = event.build();
        let (done, stored) = if event.kind.is_terminal() {
            let (done, stored) = oneshot::channel();
            (Some(done), Some(stored))
        } else {
            (None, None)
        };
        let span = tracing::Span::current();
        if self.queue.send(Queued::Event { event, span, done }).is_ok()
            && let Some(stored) = stored
        {
            let _ = stored.await;
        }
    }

    /// Waits until every event emitted so far is stored or given up. A stage calls it before
    /// handing its task on, so that its events come before the next stage's in the stream.
    pub async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.queue.send(Queued::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
    }
}

async fn publish_in_order(js: jetstream::Context, mut rx: mpsc::UnboundedReceiver<Queued>) {
    while let Some(queued) = rx.recv().await {
        match queued {
            Queued::Flush(done) => {
                let _ = done.send(());
            }
            Queued::Event { event, span, done } => {
                store(&js, &event).instrument(span).await;
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
        }
    }
}

async fn store(js: &jetstream::Context, event: &JobEvent) {
    let subject = names::event_subject(event.job_id, event.kind.as_str());
    let mut headers = HeaderMap::new();
    // A job's last event is stored once however often the job's last step is delivered; any
    // other is stored once however often this publish is tried.
    let id = if event.kind.is_terminal() {
        format!("{}.{}", event.job_id, event.kind.as_str())
    } else {
        uuid::Uuid::new_v4().to_string()
    };
    headers.insert("Nats-Msg-Id", id.as_str());
    let patience = if event.kind == EventKind::Progress {
        std::time::Duration::ZERO
    } else {
        crate::publish::PATIENCE
    };
    let stored = crate::publish::publish_acked(
        js,
        &subject,
        headers,
        codec::to_msgpack(event).into(),
        patience,
    )
    .await;
    if let Err(e) = stored {
        tracing::warn!(job = %event.job_id, kind = event.kind.as_str(), error = %e, "Event not stored");
    }
}
