//! The CLI's connection to NATS. It opens only the streams and buckets a command uses, and
//! creates nothing unless it must: a least-privileged user (the prod overlay's
//! `lathe-client`, which may submit, follow and read job records, ask models and read their
//! health) can run every command its permissions cover. `lathe provision` creates every
//! resource; `submit` provisions only when no stream takes `lathe.jobs.submit` yet (a fresh
//! development server before any service ran).

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, context::PublishErrorKind, kv};
use async_nats::{Client, HeaderMap};
use lathe_proto::codec;
use lathe_proto::{JobId, names};
use lathe_runtime::artifacts::{ArtifactStore, DatasetStore};
use lathe_runtime::jobs::JobStore;
use lathe_runtime::registry::Registry;
use lathe_runtime::{NatsSettings, Resources, WorkerSettings, provision, settings};

use crate::cli::Global;

/// What to tell a user whose server lacks a resource.
const NOT_PROVISIONED: &str = "is lathe provisioned on this server? `lathe provision` (or any \
     lathe service at start) creates every stream and bucket; a user without the permission \
     to read it gets this error too";

pub struct Session {
    pub client: Client,
    pub js: jetstream::Context,
}

impl Session {
    pub async fn connect(global: &Global) -> anyhow::Result<Session> {
        let mut nats = NatsSettings::from_env()?;
        nats.url = global.nats_url.clone();
        let client = settings::connect(&nats, "lathe-cli", Duration::from_secs(5)).await?;
        let js = jetstream::new(client.clone());
        Ok(Session { client, js })
    }

    /// Creates or updates every stream, consumer and bucket (idempotent), as a service does
    /// at start.
    pub async fn provision(&self) -> anyhow::Result<Resources> {
        Ok(provision::provision(self.client.clone(), WorkerSettings::from_env()?).await?)
    }

    async fn kv(&self, bucket: &str) -> anyhow::Result<kv::Store> {
        self.js
            .get_key_value(bucket)
            .await
            .with_context(|| format!("cannot open the {bucket} bucket ({NOT_PROVISIONED})"))
    }

    async fn object_store(
        &self,
        bucket: &str,
    ) -> anyhow::Result<jetstream::object_store::ObjectStore> {
        self.js
            .get_object_store(bucket)
            .await
            .with_context(|| format!("cannot open the {bucket} object store ({NOT_PROVISIONED})"))
    }

    pub async fn jobs(&self) -> anyhow::Result<JobStore> {
        Ok(JobStore::new(
            self.client.clone(),
            self.kv(names::JOBS_BUCKET).await?,
        ))
    }

    pub async fn registry(&self) -> anyhow::Result<Registry> {
        Ok(Registry::new(
            self.client.clone(),
            self.kv(names::MODELS_BUCKET).await?,
        ))
    }

    pub async fn health(&self) -> anyhow::Result<kv::Store> {
        self.kv(names::HEALTH_BUCKET).await
    }

    pub async fn artifacts(&self) -> anyhow::Result<ArtifactStore> {
        Ok(ArtifactStore::new(
            self.object_store(names::ARTIFACTS_BUCKET).await?,
        ))
    }

    pub async fn datasets(&self) -> anyhow::Result<DatasetStore> {
        Ok(DatasetStore::new(
            self.object_store(names::DATASETS_BUCKET).await?,
        ))
    }

    /// Publishes a spec to the submit stream with a job id chosen here, so it can be
    /// watched. When no stream takes the subject yet, provisions and publishes again.
    pub async fn submit(&self, bytes: Vec<u8>) -> anyhow::Result<JobId> {
        let job = JobId::new();
        let mut headers = HeaderMap::new();
        headers.insert(names::JOB_ID_HEADER, job.to_string().as_str());
        headers.insert(names::CONTENT_TYPE_HEADER, codec::JSON);
        // The job id doubles as the message id: publishing twice stores the job once.
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            job.to_string().as_str(),
        );
        match self.publish(&headers, &bytes).await {
            Ok(_) => Ok(job),
            Err(e) if e.kind() == PublishErrorKind::StreamNotFound => {
                self.provision().await.with_context(|| {
                    format!(
                        "no stream takes {}, and creating one failed",
                        names::SUBMIT_SUBJECT
                    )
                })?;
                self.publish(&headers, &bytes)
                    .await
                    .context("the submit stream did not confirm the job")?;
                Ok(job)
            }
            Err(e) => Err(e).context("the submit stream did not confirm the job"),
        }
    }

    async fn publish(
        &self,
        headers: &HeaderMap,
        bytes: &[u8],
    ) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
        self.js
            .publish_with_headers(
                names::SUBMIT_SUBJECT,
                headers.clone(),
                bytes.to_vec().into(),
            )
            .await?
            .await
    }
}
