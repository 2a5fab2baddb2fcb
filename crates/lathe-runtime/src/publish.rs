//! Publishing what must not be lost (a stage's task, a job's last event) through JetStream,
//! patiently: a NATS cluster electing a stream's leader answers "no stream" (no responders)
//! for several seconds, and a reconnecting client times out. Each such message carries a
//! `Nats-Msg-Id`, so the stream stores it once however often it is sent.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, ErrorCode, context::PublishError, context::PublishErrorKind};
use bytes::Bytes;

use crate::error::RuntimeError;

/// How long a publish is tried again before the caller gives up (and the message it handles
/// is redelivered): longer than a NATS cluster's leader election (up to about 10 s), shorter
/// than the intake consumer's ack wait (30 s).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Publishes and waits for the stream's ack, trying again for up to `patience` (usually
/// [`PATIENCE`]; zero tries once).
pub async fn publish_acked(
    js: &jetstream::Context,
    subject: &str,
    headers: HeaderMap,
    payload: Bytes,
    patience: Duration,
) -> Result<(), RuntimeError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut pause = Duration::from_millis(250);
    loop {
        let published = match js
            .publish_with_headers(subject.to_string(), headers.clone(), payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()),
            Err(e) => Err(e),
        };
        match published {
            Ok(()) => return Ok(()),
            Err(e) if refused(&e) => {
                return Err(RuntimeError::nats("publish", format!("{subject}: {e}")));
            }
            Err(e) if tokio::time::Instant::now() + pause < deadline => {
                tracing::debug!(error = %e, "Not stored yet; publishing again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                return Err(RuntimeError::nats("publish", format!("{subject}: {e}")));
            }
        }
    }
}

/// A refusal that no retry changes: the message is too large for the server or the stream,
/// or breaks an expectation it carries. Anything else (no responders while a leader is
/// elected, a timeout, a lost connection, a stream briefly unavailable) is tried again.
fn refused(e: &PublishError) -> bool {
    match e.kind() {
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => true,
        PublishErrorKind::Other => jetstream_code(e).is_some_and(|c| {
            c == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                || c == ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
        }),
        _ => false,
    }
}

fn jetstream_code(e: &PublishError) -> Option<ErrorCode> {
    std::error::Error::source(e)?
        .downcast_ref::<jetstream::Error>()
        .map(jetstream::Error::error_code)
}
