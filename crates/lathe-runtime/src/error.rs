//! The runtime's error type: what went wrong talking to NATS or reading what it returned.

use lathe_proto::JobId;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot provision {what}: {reason}")]
    Provision { what: String, reason: String },
    #[error("NATS {op} failed: {reason}")]
    Nats { op: &'static str, reason: String },
    #[error("job {0} has no record")]
    JobNotFound(JobId),
    #[error("job {job} record is unreadable: {reason}")]
    BadRecord { job: JobId, reason: String },
    #[error("artifact `{name}`: {reason}")]
    Artifact { name: String, reason: String },
    #[error("dataset `{name}`: {reason}")]
    Dataset { name: String, reason: String },
    /// An object exists but could not be read now (a timeout, a lost connection, a stream
    /// without a leader, no data for [`crate::artifacts::READ_STALL`]): trying again may work.
    #[error("{kind} `{name}` cannot be read now: {reason}")]
    Unreadable {
        kind: &'static str,
        name: String,
        reason: String,
    },
    #[error("invalid setting {name}: {reason}")]
    Setting { name: &'static str, reason: String },
}

impl RuntimeError {
    /// Whether trying again later may succeed: the server or the connection failed, not the
    /// request (a missing or corrupt artifact, a bad record or setting stays as it is).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RuntimeError::Connect { .. }
                | RuntimeError::Nats { .. }
                | RuntimeError::Unreadable { .. }
        )
    }

    pub fn nats(op: &'static str, e: impl std::fmt::Display) -> Self {
        RuntimeError::Nats {
            op,
            reason: e.to_string(),
        }
    }
}
