//! Publishing what must not be lost (a stage's task, a job's last event) through JetStream,
//! patiently: a NATS cluster electing a stream's leader answers "no stream" (no responders)
//! for several seconds, and a reconnecting client times out. Each such message carries a
//! `Nats-Msg-Id`, so the stream stores it once however often it is sent.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;

use crate::error::RuntimeError;

/// How long a publish is tried again before the caller gives up (and the message it handles
/// is redelivered): longer than a NATS cluster's leader election (up to about 10 s), shorter
/// than the intake consumer's ack wait (30 s).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Publishes and waits for the stream's ack, trying again for up to [`PATIENCE`].
pub async fn publish_acked(
    js: &jetstream::Context,
    subject: &str,
    headers: HeaderMap,
    payload: Bytes,
) -> Result<(), RuntimeError> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut pause = Duration::from_millis(250);
    loop {
        let published = match js
            .publish_with_headers(subject.to_string(), headers.clone(), payload.clone())
            .await
        {
            Ok(ack) => ack
                .await
                .map(|_| ())
                .map_err(|e| RuntimeError::nats("publish ack", format!("{subject}: {e}"))),
            Err(e) => Err(RuntimeError::nats("publish", format!("{subject}: {e}"))),
        };
        match published {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() + pause < deadline => {
                tracing::debug!(error = %e, "Not stored yet; publishing again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}
