//! Identifiers that carry their own rules: a job id is a UUID (and the job's trace id), a
//! model name is safe inside a NATS subject token and a KV key, a stage is one of six.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A job's id. It is a UUID so that its 16 bytes can also be the job's OpenTelemetry trace id.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(transparent)]
pub struct JobId(
    #[schemars(with = "String", description = "a UUID, also the job's trace id")] pub Uuid,
);

impl JobId {
    /// A fresh, time-ordered id (UUID v7), so job lists sort by submission time.
    pub fn new() -> Self {
        JobId(Uuid::now_v7())
    }

    /// The id as the 16 bytes of a W3C trace id.
    pub fn trace_id_bytes(&self) -> [u8; 16] {
        *self.0.as_bytes()
    }

    /// The id as 32 lowercase hex digits, the form trace UIs search by.
    pub fn trace_id_hex(&self) -> String {
        self.0.simple().to_string()
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s.trim())
            .map(JobId)
            .map_err(|e| format!("`{s}` is not a job id (a UUID): {e}"))
    }
}

/// A deployed model's name: 1–64 characters of `[A-Za-z0-9_-]`, because it becomes a token of
/// `lathe.infer.<model>` and a key of the `lathe-models` bucket.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(try_from = "String", into = "String")]
#[schemars(with = "String")]
pub struct ModelName(String);

impl ModelName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ModelName {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.is_empty() || s.len() > 64 {
            return Err(format!(
                "model name must be 1 to 64 characters, got {}",
                s.len()
            ));
        }
        if let Some(bad) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(format!(
                "model name `{s}` has `{bad}`: only letters, digits, `_` and `-` are allowed"
            ));
        }
        Ok(ModelName(s))
    }
}

impl FromStr for ModelName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ModelName::try_from(s.to_string())
    }
}

impl From<ModelName> for String {
    fn from(m: ModelName) -> String {
        m.0
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One step of the chain. The order of the variants is the only order a pipeline may take.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Train,
    Distill,
    Prune,
    Quantize,
    Deploy,
    Monitor,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Train,
        Stage::Distill,
        Stage::Prune,
        Stage::Quantize,
        Stage::Deploy,
        Stage::Monitor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Train => "train",
            Stage::Distill => "distill",
            Stage::Prune => "prune",
            Stage::Quantize => "quantize",
            Stage::Deploy => "deploy",
            Stage::Monitor => "monitor",
        }
    }

    /// The service that runs this stage (also its OpenTelemetry service name).
    pub fn service_name(self) -> &'static str {
        match self {
            Stage::Train => "lathe-trainer",
            Stage::Distill => "lathe-distiller",
            Stage::Prune => "lathe-pruner",
            Stage::Quantize => "lathe-quantizer",
            Stage::Deploy => "lathe-deployer",
            Stage::Monitor => "lathe-monitor",
        }
    }

    /// Whether this release ships a service for the stage. Intake refuses a pipeline that
    /// names a stage without one, rather than accepting a job that could never finish.
    pub fn is_available(self) -> bool {
        matches!(
            self,
            Stage::Train
                | Stage::Distill
                | Stage::Prune
                | Stage::Quantize
                | Stage::Deploy
                | Stage::Monitor
        )
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown stage `{s}` (expected one of train, distill, prune, quantize, deploy, monitor)")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_are_checked() {
        assert!(ModelName::from_str("digits-v2_a").is_ok());
        let err = ModelName::from_str("a.b").unwrap_err();
        assert!(err.contains("`.`"), "{err}");
        assert!(ModelName::from_str("").is_err());
        assert!(ModelName::from_str(&"x".repeat(65)).is_err());
    }

    #[test]
    fn job_id_is_its_trace_id() {
        let id = JobId::new();
        assert_eq!(id.trace_id_hex(), id.0.simple().to_string());
        assert_eq!(id.trace_id_bytes(), *id.0.as_bytes());
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
    }
}
