//! Model artifacts and datasets in NATS object stores. An artifact is referenced by name and
//! SHA-256 digest; a read recomputes the digest and refuses bytes that do not match, naming
//! the artifact.

use std::time::Duration;

use async_nats::jetstream::object_store::{ObjectInfo, ObjectStore};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE;
use futures::StreamExt;
use lathe_proto::{ArtifactRef, names};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::error::RuntimeError;

/// The digest of some bytes in the object store's own notation, `SHA-256=<base64url>`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("SHA-256={}", URL_SAFE.encode(Sha256::digest(bytes)))
}

/// How long a read may go without receiving a byte before it fails ([`ArtifactStore::get`],
/// [`DatasetStore::get`]). The object store's reader otherwise waits forever for chunks that
/// are gone (an object whose description survived its data): a stage would hold its task,
/// heartbeating, and the job would never end; a deployer would never switch versions. A NATS
/// cluster's leader election (up to about 10 s) stays well inside it.
pub const READ_STALL: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct ArtifactStore {
    store: ObjectStore,
    stall: Duration,
}

impl ArtifactStore {
    pub fn new(store: ObjectStore) -> Self {
        ArtifactStore {
            store,
            stall: READ_STALL,
        }
    }

    /// The same store, whose reads fail after `stall` without a byte instead of [`READ_STALL`].
    pub fn with_read_stall(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }

    /// Stores an artifact under `name` (replacing an earlier attempt's) and returns its
    /// reference.
    pub async fn put(&self, name: &str, bytes: &[u8]) -> Result<ArtifactRef, RuntimeError> {
        let mut reader = bytes;
        self.store
            .put(name, &mut reader)
            .await
            .map_err(|e| RuntimeError::Artifact {
                name: name.into(),
                reason: format!("cannot store: {e}"),
            })?;
        Ok(ArtifactRef {
            bucket: names::ARTIFACTS_BUCKET.into(),
            name: name.into(),
            digest: digest_of(bytes),
            bytes: bytes.len() as u64,
        })
    }

    /// Reads an artifact and checks its bytes against the reference's digest.
    pub async fn get(&self, r: &ArtifactRef) -> Result<Vec<u8>, RuntimeError> {
        let bytes = read_object(&self.store, &r.name, self.stall)
            .await
            .map_err(|e| {
                let not_found = RuntimeError::Artifact {
                    name: r.name.clone(),
                    reason: "not found".into(),
                };
                e.into_error("artifact", &r.name, not_found)
            })?;
        let actual = digest_of(&bytes);
        if actual != r.digest {
            return Err(RuntimeError::Artifact {
                name: r.name.clone(),
                reason: format!(
                    "digest mismatch: expected {}, got {actual} (the stored artifact is corrupt)",
                    r.digest
                ),
            });
        }
        Ok(bytes)
    }

    /// Whether an artifact exists with the given digest (idempotent redelivery).
    pub async fn exists(&self, r: &ArtifactRef) -> bool {
        match self.store.info(&r.name).await {
            Ok(info) => info.digest.as_deref() == Some(r.digest.as_str()) && !info.deleted,
            Err(_) => false,
        }
    }

    /// The underlying object store, for tools.
    pub fn raw(&self) -> &ObjectStore {
        &self.store
    }
}

/// Why an object could not be read.
enum ReadFailure {
    NotFound,
    /// Anything else: the server, the connection or the stream failed; trying again may work.
    Unreadable(String),
}

impl ReadFailure {
    /// `not_found` for a missing object, else [`RuntimeError::Unreadable`] naming the
    /// `kind` of object and its name.
    fn into_error(self, kind: &'static str, name: &str, not_found: RuntimeError) -> RuntimeError {
        match self {
            ReadFailure::NotFound => not_found,
            ReadFailure::Unreadable(reason) => RuntimeError::Unreadable {
                kind,
                name: name.into(),
                reason,
            },
        }
    }
}

async fn read_object(
    store: &ObjectStore,
    name: &str,
    stall: Duration,
) -> Result<Vec<u8>, ReadFailure> {
    let mut object = tokio::time::timeout(stall, store.get(name))
        .await
        .map_err(|_| {
            ReadFailure::Unreadable(format!("no answer from the object store within {stall:?}"))
        })?
        .map_err(|e| match e.kind() {
            async_nats::jetstream::object_store::GetErrorKind::NotFound => ReadFailure::NotFound,
            _ => ReadFailure::Unreadable(e.to_string()),
        })?;
    let size = object.info.size;
    let mut bytes = Vec::with_capacity(size);
    loop {
        match tokio::time::timeout(stall, object.read_buf(&mut bytes)).await {
            Ok(Ok(0)) => return Ok(bytes),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(ReadFailure::Unreadable(e.to_string())),
            Err(_) => {
                return Err(ReadFailure::Unreadable(format!(
                    "no data for {stall:?} after {} of {size} bytes (its chunks are missing \
                     from the bucket, or the server stopped answering)",
                    bytes.len()
                )));
            }
        }
    }
}

/// Uploaded datasets (`lathe dataset put`), read by the trainer for `bucket:<name>` sources.
#[derive(Clone)]
pub struct DatasetStore {
    store: ObjectStore,
}

/// One stored dataset, as `lathe dataset list` shows it.
#[derive(Clone, Debug)]
pub struct DatasetInfo {
    pub name: String,
    pub bytes: u64,
    pub digest: String,
}

impl DatasetStore {
    pub fn new(store: ObjectStore) -> Self {
        DatasetStore { store }
    }

    pub async fn put(&self, name: &str, bytes: &[u8]) -> Result<DatasetInfo, RuntimeError> {
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(RuntimeError::Dataset {
                name: name.into(),
                reason: "a name must be non-empty and contain no spaces".into(),
            });
        }
        let mut reader = bytes;
        self.store
            .put(name, &mut reader)
            .await
            .map_err(|e| RuntimeError::Dataset {
                name: name.into(),
                reason: format!("cannot store: {e}"),
            })?;
        Ok(DatasetInfo {
            name: name.into(),
            bytes: bytes.len() as u64,
            digest: digest_of(bytes),
        })
    }

    pub async fn get(&self, name: &str) -> Result<Vec<u8>, RuntimeError> {
        read_object(&self.store, name, READ_STALL)
            .await
            .map_err(|e| {
                let not_found = RuntimeError::Dataset {
                    name: name.into(),
                    reason: format!("not found in bucket {}", names::DATASETS_BUCKET),
                };
                e.into_error("dataset", name, not_found)
            })
    }

    pub async fn list(&self) -> Result<Vec<DatasetInfo>, RuntimeError> {
        let mut out: Vec<DatasetInfo> = list_objects(&self.store)
            .await?
            .into_iter()
            .map(|info| DatasetInfo {
                name: info.name,
                bytes: info.size as u64,
                digest: info.digest.unwrap_or_default(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// The objects a store holds now (deleted ones left out).
async fn list_objects(store: &ObjectStore) -> Result<Vec<ObjectInfo>, RuntimeError> {
    let mut list = store
        .list()
        .await
        .map_err(|e| RuntimeError::nats("object list", e))?;
    let mut out = Vec::new();
    while let Some(info) = list.next().await {
        let info = info.map_err(|e| RuntimeError::nats("object list", e))?;
        if !info.deleted {
            out.push(info);
        }
    }
    Ok(out)
}

/// What [`collect_garbage`] found, and removed unless it was a dry run.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct GarbageReport {
    /// Artifacts in the bucket.
    pub examined: usize,
    /// Kept because a version in the model registry points to them.
    pub kept_in_registry: usize,
    /// Kept because their job is still running or ended after the cutoff.
    pub kept_recent: usize,
    /// Kept because no job record names them (never guessed at).
    pub kept_without_record: usize,
    /// Removed (or, in a dry run, to be removed): name and bytes.
    pub removed: Vec<(String, u64)>,
    pub removed_bytes: u64,
    /// Job records removed (or to be removed): jobs that ended before the cutoff and that no
    /// registered version comes from.
    #[serde(default)]
    pub removed_jobs: Vec<String>,
    /// Records of ended jobs kept because a registered version comes from them.
    #[serde(default)]
    pub kept_jobs_in_registry: usize,
    /// Registry versions forgotten (or to be) under `keep_versions`: model and version.
    #[serde(default)]
    pub forgotten_versions: Vec<(String, u32)>,
    pub dry_run: bool,
}

/// Removes the artifacts nothing needs any more: those of jobs that ended (completed, failed
/// or rejected) before `cutoff_ms`, unless a version in the model registry points to them —
/// active, canary or retired alike, so a rollback still finds its artifact. A running job's
/// artifacts, an artifact whose name names no (readable) job record, and everything newer
/// than the cutoff are kept. Then the records of those old jobs go too, except a job a registered
/// version comes from (its lineage stays readable). Records go after their artifacts: a run
/// cut short between the two leaves records whose artifacts are gone, which the next run
/// removes, never artifacts without a record, which no run would dare remove.
///
/// With `keep_versions`, each model's registry entry first forgets its old versions (see
/// `ModelEntry::forget_old_versions`: the active version, the canary, the active one's
/// rollback target and the newest `keep_versions` others stay), by compare-and-set; their
/// artifacts and records then go like any other. With `dry_run`, reports what would go and
/// changes nothing.
pub async fn collect_garbage(
    artifacts: &ArtifactStore,
    registry: &crate::registry::Registry,
    jobs: &crate::jobs::JobStore,
    cutoff_ms: u64,
    keep_versions: Option<usize>,
    dry_run: bool,
) -> Result<GarbageReport, RuntimeError> {
    let mut report = GarbageReport {
        dry_run,
        ..Default::default()
    };
    let mut referenced = std::collections::BTreeSet::new();
    let mut registered_jobs = std::collections::BTreeSet::new();
    for mut entry in registry.list().await? {
        if let Some(keep) = keep_versions {
            let mut forgotten = entry.forget_old_versions(keep, "lathe gc");
            // Written only when there is something to forget: every write wakes the replicas.
            if !forgotten.is_empty() && !dry_run {
                let (written, gone) = registry
                    .update(&entry.model, false, |e| {
                        Ok(e.forget_old_versions(keep, "lathe gc"))
                    })
                    .await
                    .map_err(|e| RuntimeError::Nats {
                        op: "registry update",
                        reason: e.to_string(),
                    })?;
                entry = written;
                forgotten = gone;
            }
            report.forgotten_versions.extend(
                forgotten
                    .iter()
                    .map(|v| (entry.model.to_string(), v.version)),
            );
        }
        for v in entry.versions {
            registered_jobs.insert(v.job_id);
            referenced.insert(v.artifact.name);
        }
    }
    // Every job record, read once: whether its job ended before the cutoff, and the revision
    // a purge expects. Read before the artifacts are listed, so the artifact of a job that
    // starts meanwhile has no record here and is kept.
    let records = jobs.list_with_revisions().await?;
    let old: std::collections::BTreeMap<String, bool> = records
        .iter()
        .map(|(r, _)| {
            (
                r.job_id.to_string(),
                crate::jobs::ended_before(r, cutoff_ms),
            )
        })
        .collect();
    let objects = list_objects(&artifacts.store).await?;
    report.examined = objects.len();
    for info in objects {
        let (name, size) = (info.name, info.size as u64);
        if referenced.contains(&name) {
            report.kept_in_registry += 1;
            continue;
        }
        // Artifact names are `<job>/<step>-<stage>` (names::artifact_name).
        match old.get(name.split('/').next().unwrap_or_default()) {
            None => report.kept_without_record += 1,
            Some(false) => report.kept_recent += 1,
            Some(true) => {
                if !dry_run {
                    artifacts
                        .store
                        .delete(&name)
                        .await
                        .map_err(|e| RuntimeError::Artifact {
                            name: name.clone(),
                            reason: format!("cannot delete: {e}"),
                        })?;
                }
                report.removed_bytes += size;
                report.removed.push((name, size));
            }
        }
    }

    for (record, revision) in records {
        if !crate::jobs::ended_before(&record, cutoff_ms) {
            continue;
        }
        if registered_jobs.contains(&record.job_id) {
            report.kept_jobs_in_registry += 1;
            continue;
        }
        if !dry_run {
            jobs.purge(record.job_id, revision).await?;
        }
        report.removed_jobs.push(record.job_id.to_string());
    }
    Ok(report)
}
