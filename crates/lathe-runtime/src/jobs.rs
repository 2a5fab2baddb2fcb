//! Job records in the `lathe-jobs` bucket. Every change is a compare-and-set on the entry's
//! revision, retried on conflict, so two services updating one job never lose a write.

use async_nats::jetstream::kv;
use lathe_proto::{JobId, JobRecord, JobState, StepState, codec, now_ms};

use crate::error::RuntimeError;

#[derive(Clone)]
pub struct JobStore {
    kv: kv::Store,
    /// For the reply inbox of a whole-bucket read ([`crate::kv_scan`]).
    client: async_nats::Client,
}

/// What a record update closure decides.
pub enum Change {
    /// Write the modified record.
    Write,
    /// Leave the record as it is.
    Keep,
}

impl JobStore {
    pub fn new(client: async_nats::Client, kv: kv::Store) -> Self {
        JobStore { kv, client }
    }

    fn decode(job: JobId, bytes: &[u8]) -> Result<JobRecord, RuntimeError> {
        codec::from_msgpack(bytes).map_err(|e| RuntimeError::BadRecord {
            job,
            reason: e.to_string(),
        })
    }

    /// The record and its revision, if the job exists.
    pub async fn get(&self, job: JobId) -> Result<Option<(JobRecord, u64)>, RuntimeError> {
        match self
            .kv
            .entry(job.to_string())
            .await
            .map_err(|e| RuntimeError::nats("kv get", e))?
        {
            Some(entry) if entry.operation == kv::Operation::Put => {
                Ok(Some((Self::decode(job, &entry.value)?, entry.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Creates a record; `Ok(false)` when the job already has one (a redelivered submit).
    pub async fn create(&self, record: &JobRecord) -> Result<bool, RuntimeError> {
        match self
            .kv
            .create(record.job_id.to_string(), codec::to_msgpack(record).into())
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(RuntimeError::nats("kv create", e)),
        }
    }

    /// Reads, changes and writes back a record by compare-and-set, retrying on conflict.
    pub async fn update<F>(&self, job: JobId, mut change: F) -> Result<JobRecord, RuntimeError>
    where
        F: FnMut(&mut JobRecord) -> Change,
    {
        let mut conflicts = 0;
        loop {
            let (mut record, revision) =
                self.get(job).await?.ok_or(RuntimeError::JobNotFound(job))?;
            if let Change::Keep = change(&mut record) {
                return Ok(record);
            }
            record.updated_at_ms = now_ms();
            match self
                .kv
                .update(job.to_string(), codec::to_msgpack(&record).into(), revision)
                .await
            {
                Ok(_) => return Ok(record),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision && conflicts < 100 => {
                    conflicts += 1;
                    continue;
                }
                Err(e) => return Err(RuntimeError::nats("kv update", e)),
            }
        }
    }

    /// Marks a job failed with `error` (and, given a step, that step with its own reason),
    /// unless it already ended. Returns the record when this call ended the job: the caller
    /// then ends the job's trace and announces it.
    pub async fn fail(
        &self,
        job: JobId,
        error: &str,
        step: Option<(u32, &str)>,
    ) -> Result<Option<JobRecord>, RuntimeError> {
        let now = now_ms();
        // The closure may run again on a conflict; the last run decides.
        let mut ended_here = false;
        let record = self
            .update(job, |r| {
                ended_here = !r.state.is_terminal();
                if !ended_here {
                    return Change::Keep;
                }
                r.state = JobState::Failed;
                r.error = Some(error.to_string());
                r.finished_at_ms = Some(now);
                if let Some((step, reason)) = step
                    && let Some(s) = r.steps.get_mut(step as usize)
                {
                    s.state = StepState::Failed;
                    s.error = Some(reason.to_string());
                    s.finished_at_ms = Some(now);
                }
                Change::Write
            })
            .await?;
        Ok(ended_here.then_some(record))
    }

    /// Removes a job's record, every revision of it, if it is still at `revision` (a record
    /// that changed since it was read stays, and the call fails). A KV purge leaves a marker
    /// message behind, one per key, which would pile up over the years: the marker goes too,
    /// by a purge of the key's subject up to the marker's own sequence, so nothing written
    /// after it could be lost.
    pub async fn purge(&self, job: JobId, revision: u64) -> Result<(), RuntimeError> {
        let key = job.to_string();
        self.kv
            .purge_expect_revision(&key, Some(revision))
            .await
            .map_err(|e| RuntimeError::nats("kv purge", e))?;
        if let Some(marker) = self
            .kv
            .entry(&key)
            .await
            .map_err(|e| RuntimeError::nats("kv get", e))?
            && marker.operation != kv::Operation::Put
        {
            self.kv
                .stream
                .purge()
                .filter(format!("{}{key}", self.kv.prefix))
                .sequence(marker.revision + 1)
                .await
                .map_err(|e| RuntimeError::nats("purge the record's marker", e))?;
        }
        Ok(())
    }

    /// Every job record (for `lathe jobs`); unreadable ones are skipped with a warning.
    pub async fn list(&self) -> Result<Vec<JobRecord>, RuntimeError> {
        Ok(self
            .list_with_revisions()
            .await?
            .into_iter()
            .map(|(r, _)| r)
            .collect())
    }

    /// Every job record with its revision, oldest submission first, read in one pass over
    /// the bucket ([`crate::kv_scan`]); unreadable ones are skipped with a warning.
    pub async fn list_with_revisions(&self) -> Result<Vec<(JobRecord, u64)>, RuntimeError> {
        let mut out = Vec::new();
        for latest in crate::kv_scan::latest_values::<JobId>(&self.client, &self.kv).await? {
            let job = latest.key;
            match Self::decode(job, &latest.value) {
                Ok(record) => out.push((record, latest.revision)),
                Err(e) => tracing::warn!(%job, error = %e, "Skipping unreadable job record"),
            }
        }
        out.sort_by_key(|(r, _)| r.submitted_at_ms);
        Ok(out)
    }
}

/// Whether a job ended (completed, failed or rejected) before `cutoff_ms`.
pub fn ended_before(record: &JobRecord, cutoff_ms: u64) -> bool {
    record.state.is_terminal() && record.finished_at_ms.unwrap_or(record.updated_at_ms) < cutoff_ms
}
