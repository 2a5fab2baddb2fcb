//! Job events on `lathe.events.<job>.<kind>`, stored in the `LATHE_EVENTS` stream so a
//! watcher that starts late still sees the whole history.

use std::collections::{BTreeMap, VecDeque};

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
    /// must not hold the queue for each of them (one still queued when a later one of its
    /// step arrives is dropped).
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
    let mut pending = VecDeque::new();
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(queued) => pending.push_back(queued),
                None => return,
            }
        }
        // Everything emitted meanwhile, so a progress event can see whether a later one of
        // its step is already waiting.
        while let Ok(queued) = rx.try_recv() {
            pending.push_back(queued);
        }
        match next_to_store(&mut pending) {
            Some(Queued::Flush(done)) => {
                let _ = done.send(());
            }
            Some(Queued::Event { event, span, done }) => {
                store(&js, &event).instrument(span).await;
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            None => {}
        }
    }
}

/// The next queued item to handle, dropping the progress events at the front that a later
/// progress event of the same step (still queued) supersedes: while the server is away each
/// publish waits for its ack to time out, and a step's progress must not hold its own and
/// other jobs' events back once per epoch. Everything else keeps its order.
fn next_to_store(pending: &mut VecDeque<Queued>) -> Option<Queued> {
    while let Some(queued) = pending.pop_front() {
        let superseded = match &queued {
            Queued::Event { event, .. } if event.kind == EventKind::Progress => {
                pending.iter().any(|later| {
                    matches!(later, Queued::Event { event: e, .. }
                        if e.kind == EventKind::Progress
                            && e.job_id == event.job_id
                            && e.step == event.step)
                })
            }
            _ => false,
        };
        if !superseded {
            return Some(queued);
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(job: JobId, kind: EventKind, step: u32, epoch: u32) -> Queued {
        let mut b = EventBuilder::new(job, kind, format!("epoch {epoch}")).step(step, Stage::Train);
        if kind == EventKind::Progress {
            b = b.progress(Progress {
                epoch,
                epochs: 10,
                metrics: BTreeMap::new(),
            });
        }
        Queued::Event {
            event: b.build(),
            span: tracing::Span::none(),
            done: None,
        }
    }

    #[test]
    fn a_progress_event_with_a_later_one_of_its_step_queued_is_dropped_and_nothing_else() {
        let (a, b) = (JobId::new(), JobId::new());
        let (flushed, _rx) = oneshot::channel();
        let mut pending = VecDeque::from([
            queued(a, EventKind::StageStarted, 0, 0),
            queued(a, EventKind::Progress, 0, 1),
            queued(b, EventKind::Progress, 0, 1),
            queued(a, EventKind::Progress, 0, 2),
            queued(a, EventKind::Progress, 1, 1),
            Queued::Flush(flushed),
            queued(a, EventKind::Progress, 0, 3),
            queued(a, EventKind::StageCompleted, 0, 0),
        ]);
        let mut handled = Vec::new();
        while let Some(q) = next_to_store(&mut pending) {
            handled.push(match q {
                Queued::Flush(_) => "flush".to_string(),
                Queued::Event { event, .. } => format!(
                    "{} {} step {} {}",
                    if event.job_id == a { "a" } else { "b" },
                    event.kind.as_str(),
                    event.step.unwrap_or(0),
                    event.message
                ),
            });
        }
        // Job a's step 0 progress for epochs 1 and 2 gives way to epoch 3; another job's
        // and another step's progress, the flush and the other kinds stay, in order.
        assert_eq!(
            handled,
            [
                "a stage_started step 0 epoch 0",
                "b progress step 0 epoch 1",
                "a progress step 1 epoch 1",
                "flush",
                "a progress step 0 epoch 3",
                "a stage_completed step 0 epoch 0",
            ]
        );
    }
}
