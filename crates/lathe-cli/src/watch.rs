//! Following a job: its events replayed from the start of the `LATHE_EVENTS` stream and then
//! live, drawn as one progress bar per stage (epochs) — or printed as JSON lines.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use lathe_proto::{EventKind, FieldError, JobEvent, JobId, JobRecord, JobState, codec, names};

/// How the job ended, as seen by the watcher.
pub enum Ending {
    Completed,
    Failed(String),
    Rejected(String),
}

/// How a job ended, from its record; `None` while it runs. For a job whose events are gone:
/// they expire after 7 days, and its record stays until `lathe gc`.
pub fn ending_of(record: &JobRecord) -> Option<Ending> {
    let message = record.error.clone().unwrap_or_default();
    match record.state {
        JobState::Completed => Some(Ending::Completed),
        JobState::Failed => Some(Ending::Failed(message)),
        JobState::Rejected => Some(Ending::Rejected(reasons(&record.errors, message))),
        JobState::Queued | JobState::Running => None,
    }
}

/// A rejection's field errors, one a line, or its message when it has none.
fn reasons(errors: &[FieldError], message: String) -> String {
    if errors.is_empty() {
        message
    } else {
        errors
            .iter()
            .map(|e| format!("  {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Follows a job's events until its last. `ended`, how its record says it ended, answers at
/// once when no event of the job is stored any more.
pub async fn watch(
    js: &jetstream::Context,
    job: JobId,
    json: bool,
    ended: Option<Ending>,
) -> anyhow::Result<Ending> {
    let stream = js.get_stream(names::EVENTS_STREAM).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: names::job_events_filter(job),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    if consumer.cached_info().num_pending == 0
        && let Some(ending) = ended
    {
        return Ok(ending);
    }
    let mut messages = consumer.messages().await?;
    let multi = MultiProgress::new();
    if json {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg}")
        .expect("a valid template")
        .progress_chars("=> ");
    let mut bars: BTreeMap<u32, ProgressBar> = BTreeMap::new();
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let event: JobEvent = match codec::from_msgpack(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("lathe: skipping an unreadable event: {e}");
                continue;
            }
        };
        if json {
            outln!("{}", serde_json::to_string(&event)?);
        }
        let bar_for =
            |bars: &mut BTreeMap<u32, ProgressBar>, event: &JobEvent| -> Option<ProgressBar> {
                let step = event.step?;
                Some(
                    bars.entry(step)
                        .or_insert_with(|| {
                            let b = multi.add(ProgressBar::new(1));
                            b.set_style(style.clone());
                            b.set_prefix(event.stage.map(|s| s.to_string()).unwrap_or_default());
                            b
                        })
                        .clone(),
                )
            };
        match event.kind {
            EventKind::Accepted => {
                if !json {
                    let _ = multi.println(format!("job {job}: {}", event.message));
                }
            }
            EventKind::StageStarted | EventKind::StageRetry => {
                if let Some(b) = bar_for(&mut bars, &event) {
                    b.set_message(event.message.clone());
                }
            }
            EventKind::Progress => {
                if let (Some(b), Some(p)) = (bar_for(&mut bars, &event), &event.progress) {
                    b.set_length(p.epochs as u64);
                    b.set_position(p.epoch as u64);
                    let acc = p
                        .metrics
                        .get("validation_accuracy")
                        .map(|a| format!("val acc {:.2} %", a * 100.0));
                    let loss = p.metrics.get("train_loss").map(|l| format!("loss {l:.4}"));
                    b.set_message(
                        [loss, acc]
                            .into_iter()
                            .flatten()
                            .collect::<Vec<_>>()
                            .join(", "),
                    );
                }
            }
            EventKind::StageCompleted => {
                if let Some(b) = bar_for(&mut bars, &event) {
                    let len = b.length().unwrap_or(1).max(1);
                    b.set_length(len);
                    b.set_position(len);
                    let acc = event
                        .metrics
                        .get("test_accuracy")
                        .map(|a| format!("test acc {:.2} %", a * 100.0));
                    let bytes = event
                        .metrics
                        .get("artifact_bytes")
                        .map(|b| format!("{} bytes", *b as u64));
                    b.finish_with_message(
                        ["done".to_string()]
                            .into_iter()
                            .chain(acc)
                            .chain(bytes)
                            .collect::<Vec<_>>()
                            .join(", "),
                    );
                }
            }
            EventKind::StageFailed => {
                if let Some(b) = bar_for(&mut bars, &event) {
                    b.abandon_with_message(format!("failed: {}", event.message));
                }
            }
            EventKind::Alert => eprintln!("alert: {}", event.message),
            EventKind::Completed => return Ok(Ending::Completed),
            EventKind::Failed => return Ok(Ending::Failed(event.message)),
            EventKind::Rejected => {
                return Ok(Ending::Rejected(reasons(&event.errors, event.message)));
            }
        }
    }
    anyhow::bail!("the event stream of job {job} ended before the job did")
}
