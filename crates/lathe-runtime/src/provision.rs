//! Idempotent provisioning: every stream, consumer, KV bucket and object store lathe uses is
//! created or updated to the configuration here, by every service at start, so that any one
//! of them can bring up an empty server and none depends on start order.

use std::time::Duration;

use async_nats::Client;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{self, consumer, kv, object_store, stream};
use lathe_proto::{Stage, names};

use crate::artifacts::{ArtifactStore, DatasetStore};
use crate::error::RuntimeError;
use crate::events::Events;
use crate::jobs::JobStore;
use crate::registry::Registry;
use crate::settings::WorkerSettings;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Deliveries of a submission before intake gives up on it (fails its job, dead-letters it).
pub const INTAKE_MAX_DELIVER: i64 = 5;

/// Everything a service needs, provisioned and opened.
#[derive(Clone)]
pub struct Resources {
    pub client: Client,
    pub js: jetstream::Context,
    pub jobs: JobStore,
    pub events: Events,
    pub artifacts: ArtifactStore,
    pub datasets: DatasetStore,
    pub registry: Registry,
    /// Model health, written by the monitor.
    pub health: kv::Store,
    pub worker: WorkerSettings,
}

fn prov(what: impl Into<String>) -> impl FnOnce(String) -> RuntimeError {
    let what = what.into();
    move |reason| RuntimeError::Provision { what, reason }
}

/// The configuration of a stage's durable pull consumer. Ack wait and deliveries come from
/// the worker settings; updating them on a running consumer is allowed.
pub fn stage_consumer_config(stage: Stage, w: &WorkerSettings) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(names::stage_consumer(stage)),
        filter_subject: names::work_subject(stage),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: w.ack_wait,
        max_deliver: w.max_deliver,
        // Replicas × concurrency tasks may be in flight at once; leave ample room.
        max_ack_pending: 1024,
        description: Some(format!("every replica of the {stage} stage")),
        ..Default::default()
    }
}

/// A stream's configuration as the server has it, or `None` when it does not exist.
async fn existing_config(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Option<stream::Config>, RuntimeError> {
    match js.get_stream(stream).await {
        Ok(s) => Ok(Some(s.cached_info().config.clone())),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                Ok(None)
            }
            _ => Err(prov(format!("stream {stream}"))(e.to_string())),
        },
    }
}

/// The copies a stream gets: `LATHE_STREAM_REPLICAS` when set, else the ones it has (1 when
/// new), so that a process without the setting never scales a cluster's streams down.
async fn replicas_for(
    js: &jetstream::Context,
    stream: &str,
    setting: Option<usize>,
) -> Result<usize, RuntimeError> {
    match setting {
        Some(n) => Ok(n),
        None => Ok(existing_config(js, stream)
            .await?
            .map_or(1, |c| c.num_replicas)),
    }
}

/// Creates or updates every resource and opens them.
pub async fn provision(client: Client, worker: WorkerSettings) -> Result<Resources, RuntimeError> {
    let js = jetstream::new(client.clone());
    let setting = worker.stream_replicas;

    let streams = [
        stream::Config {
            name: names::SUBMIT_STREAM.into(),
            subjects: vec![names::SUBMIT_SUBJECT.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: 7 * DAY,
            duplicate_window: Duration::from_secs(120),
            description: Some("job specs as users submit them".into()),
            ..Default::default()
        },
        stream::Config {
            name: names::WORK_STREAM.into(),
            subjects: vec![names::WORK_SUBJECTS.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            description: Some("stage tasks; one durable consumer per stage".into()),
            ..Default::default()
        },
        stream::Config {
            name: names::EVENTS_STREAM.into(),
            subjects: vec![names::EVENTS_SUBJECTS.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: 7 * DAY,
            description: Some("job lifecycle events".into()),
            ..Default::default()
        },
        stream::Config {
            name: names::DEAD_STREAM.into(),
            subjects: vec![names::DEAD_SUBJECTS.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: 30 * DAY,
            description: Some("messages no service could process, kept for operators".into()),
            ..Default::default()
        },
        stream::Config {
            name: names::ALERTS_STREAM.into(),
            subjects: vec![names::ALERTS_SUBJECTS.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: 30 * DAY,
            // Every monitor replica evaluates every model; the alert's id drops the copies.
            duplicate_window: Duration::from_secs(600),
            description: Some("alerts raised by the monitor".into()),
            ..Default::default()
        },
    ];
    for mut cfg in streams {
        let name = cfg.name.clone();
        cfg.num_replicas = replicas_for(&js, &name, setting).await?;
        js.create_or_update_stream(cfg)
            .await
            .map_err(|e| prov(format!("stream {name}"))(e.to_string()))?;
    }

    let submit = js
        .get_stream(names::SUBMIT_STREAM)
        .await
        .map_err(|e| prov("stream LATHE_SUBMIT")(e.to_string()))?;
    submit
        .create_consumer(consumer::pull::Config {
            durable_name: Some(names::INTAKE_CONSUMER.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_deliver: INTAKE_MAX_DELIVER,
            description: Some("job intake, shared by every lathe service".into()),
            ..Default::default()
        })
        .await
        .map_err(|e| prov("consumer intake")(e.to_string()))?;

    let work = js
        .get_stream(names::WORK_STREAM)
        .await
        .map_err(|e| prov("stream LATHE_WORK")(e.to_string()))?;
    for stage in Stage::ALL {
        work.create_consumer(stage_consumer_config(stage, &worker))
            .await
            .map_err(|e| {
                prov(format!("consumer {}", names::stage_consumer(stage)))(e.to_string())
            })?;
    }

    let jobs_kv = js
        .create_or_update_key_value(kv::Config {
            bucket: names::JOBS_BUCKET.into(),
            num_replicas: replicas_for(&js, &format!("KV_{}", names::JOBS_BUCKET), setting).await?,
            history: 10,
            storage: stream::StorageType::File,
            description: "job records".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| prov("bucket lathe-jobs")(e.to_string()))?;
    let models_kv = js
        .create_or_update_key_value(kv::Config {
            bucket: names::MODELS_BUCKET.into(),
            num_replicas: replicas_for(&js, &format!("KV_{}", names::MODELS_BUCKET), setting)
                .await?,
            history: 64,
            storage: stream::StorageType::File,
            description: "model registry".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| prov("bucket lathe-models")(e.to_string()))?;

    let health_kv = js
        .create_or_update_key_value(kv::Config {
            bucket: names::HEALTH_BUCKET.into(),
            num_replicas: replicas_for(&js, &format!("KV_{}", names::HEALTH_BUCKET), setting)
                .await?,
            history: 1,
            storage: stream::StorageType::File,
            description: "model health, written by the monitor".into(),
            ..Default::default()
        })
        .await
        .map_err(|e| prov("bucket lathe-health")(e.to_string()))?;

    let artifacts =
        object_store_open(&js, names::ARTIFACTS_BUCKET, "model artifacts", setting).await?;
    let datasets =
        object_store_open(&js, names::DATASETS_BUCKET, "uploaded datasets", setting).await?;

    Ok(Resources {
        jobs: JobStore::new(client.clone(), jobs_kv),
        registry: Registry::new(client.clone(), models_kv),
        client,
        js: js.clone(),
        events: Events::new(js.clone()),
        artifacts: ArtifactStore::new(artifacts),
        datasets: DatasetStore::new(datasets),
        health: health_kv,
        worker,
    })
}

/// Creates an object store, or opens it and brings its copies to the setting (an object
/// store has no create-or-update of its own; its backing stream does).
async fn object_store_open(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    setting: Option<usize>,
) -> Result<object_store::ObjectStore, RuntimeError> {
    let stream = format!("OBJ_{bucket}");
    match existing_config(js, &stream).await? {
        None => {
            let cfg = object_store::Config {
                bucket: bucket.into(),
                description: Some(description.into()),
                storage: stream::StorageType::File,
                num_replicas: setting.unwrap_or(1),
                ..Default::default()
            };
            if let Ok(store) = js.create_object_store(cfg).await {
                return Ok(store);
            }
            // Created by another service meanwhile: opened below.
        }
        Some(mut cfg) => {
            if let Some(want) = setting.filter(|w| *w != cfg.num_replicas) {
                cfg.num_replicas = want;
                js.update_stream(cfg)
                    .await
                    .map_err(|e| prov(format!("stream {stream}"))(e.to_string()))?;
            }
        }
    }
    js.get_object_store(bucket)
        .await
        .map_err(|e| prov(format!("object store {bucket}"))(e.to_string()))
}
