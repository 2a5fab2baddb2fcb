//! The model registry in the `lathe-models` KV bucket. The rules of every change live in
//! [`lathe_proto::registry::ModelEntry`]; this wraps them in compare-and-set on the entry's
//! revision, retried on conflict, so two deployers (or a deployer, a monitor and a person
//! at the CLI) racing on one model never lose an update.

use async_nats::jetstream::kv;
use lathe_proto::registry::{ModelEntry, RegistryError};
use lathe_proto::{ModelName, codec};

use crate::error::RuntimeError;

/// Why a registry operation failed: the change was refused, or NATS failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryOpError {
    #[error(transparent)]
    Refused(#[from] RegistryError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

#[derive(Clone)]
pub struct Registry {
    kv: kv::Store,
    /// For the reply inbox of a whole-bucket read ([`crate::kv_scan`]).
    client: async_nats::Client,
}

impl Registry {
    pub fn new(client: async_nats::Client, kv: kv::Store) -> Self {
        Registry { kv, client }
    }

    /// The bucket, for watchers.
    pub fn kv(&self) -> &kv::Store {
        &self.kv
    }

    /// Decodes an entry's bytes, naming the model when they are unreadable.
    pub fn decode(model: &str, bytes: &[u8]) -> Result<ModelEntry, RuntimeError> {
        codec::from_msgpack(bytes).map_err(|e| RuntimeError::Nats {
            op: "registry read",
            reason: format!("the registry entry of model `{model}` is unreadable: {e}"),
        })
    }

    /// The entry and its revision, if the model is registered.
    pub async fn get(&self, model: &ModelName) -> Result<Option<(ModelEntry, u64)>, RuntimeError> {
        match self
            .kv
            .entry(model.as_str())
            .await
            .map_err(|e| RuntimeError::nats("registry get", e))?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((Self::decode(model.as_str(), &e.value)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Every registered model, by name.
    pub async fn list(&self) -> Result<Vec<ModelEntry>, RuntimeError> {
        Ok(self
            .list_with_revisions()
            .await?
            .into_iter()
            .map(|(e, _)| e)
            .collect())
    }

    /// Every registered model with its entry's revision, by name, read in one pass over the
    /// bucket ([`crate::kv_scan`]).
    pub async fn list_with_revisions(&self) -> Result<Vec<(ModelEntry, u64)>, RuntimeError> {
        let mut out = Vec::new();
        for latest in crate::kv_scan::latest_values::<ModelName>(&self.client, &self.kv).await? {
            out.push((
                Self::decode(latest.key.as_str(), &latest.value)?,
                latest.revision,
            ));
        }
        out.sort_by(|a, b| a.0.model.cmp(&b.0.model));
        Ok(out)
    }

    /// Reads, changes and writes back a model's entry by compare-and-set, retrying on
    /// conflict. `create` says whether a missing model starts empty (a deploy) or is an
    /// error (promote, rollback). The closure's result comes back with the written entry.
    pub async fn update<T, F>(
        &self,
        model: &ModelName,
        create: bool,
        mut change: F,
    ) -> Result<(ModelEntry, T), RegistryOpError>
    where
        F: FnMut(&mut ModelEntry) -> Result<T, RegistryError>,
    {
        for _ in 0..100 {
            let current = self.get(model).await?;
            let (mut entry, revision) = match current {
                Some((e, r)) => (e, Some(r)),
                None if create => (ModelEntry::new(model.clone()), None),
                None => return Err(RegistryError::UnknownModel(model.to_string()).into()),
            };
            let out = change(&mut entry)?;
            let bytes = codec::to_msgpack(&entry);
            let written = match revision {
                Some(rev) => match self.kv.update(model.as_str(), bytes.into(), rev).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                    Err(e) => return Err(RuntimeError::nats("registry update", e).into()),
                },
                None => match self.kv.create(model.as_str(), bytes.into()).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                    Err(e) => return Err(RuntimeError::nats("registry create", e).into()),
                },
            };
            if written {
                return Ok((entry, out));
            }
        }
        Err(RuntimeError::Nats {
            op: "registry update",
            reason: format!("model `{model}`: 100 conflicting writes in a row"),
        }
        .into())
    }
}
