//! Every current value of a KV bucket in one pass: one ordered push consumer over the
//! bucket's stream (what the KV API's own key listing uses, so a user allowed to list keys
//! may scan), delivering the last message of every key, instead of listing the keys and then
//! reading each value with its own request (`keys` + `entry`), which costs a round trip per
//! key. `lathe jobs`, `lathe gc` and a deployer's periodic reread of the registry read whole
//! buckets.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;

use crate::error::RuntimeError;

/// How long the scan waits for the next stored message before it gives up.
const STALL: Duration = Duration::from_secs(10);

/// One key's current value and its revision (the stream sequence that wrote it).
pub struct Latest<K> {
    pub key: K,
    pub value: Bytes,
    pub revision: u64,
}

/// The current value of every key of `store` that parses as a `K` and is not deleted or
/// purged, as stored when the scan starts (writes during the scan are not waited for), in
/// stream order. Keys that do not parse (not written by lathe) are passed over.
pub async fn latest_values<K: std::str::FromStr>(
    client: &async_nats::Client,
    store: &kv::Store,
) -> Result<Vec<Latest<K>>, RuntimeError> {
    let op = "kv scan";
    let prefix = store.prefix.clone();
    let consumer = store
        .stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            filter_subject: format!("{prefix}>"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            replay_policy: consumer::ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .map_err(|e| RuntimeError::nats(op, e))?;
    let pending = consumer.cached_info().num_pending as usize;
    let mut out = Vec::with_capacity(pending);
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| RuntimeError::nats(op, e))?;
    for _ in 0..pending {
        let message = match tokio::time::timeout(STALL, messages.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => return Err(RuntimeError::nats(op, e)),
            Ok(None) => return Err(RuntimeError::nats(op, "the scan ended early")),
            Err(_) => {
                return Err(RuntimeError::nats(
                    op,
                    format!(
                        "no message for {STALL:?} with {} of {pending} read",
                        out.len()
                    ),
                ));
            }
        };
        let removed = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|v| matches!(v.as_str(), "DEL" | "PURGE"));
        if removed {
            continue;
        }
        let revision = message
            .info()
            .map_err(|e| RuntimeError::nats(op, e))?
            .stream_sequence;
        let Some(Ok(key)) = message
            .subject
            .strip_prefix(prefix.as_str())
            .map(str::parse::<K>)
        else {
            continue;
        };
        out.push(Latest {
            key,
            value: message.payload.clone(),
            revision,
        });
    }
    Ok(out)
}
