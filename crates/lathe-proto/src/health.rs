//! What the monitor measures about a deployed model, kept per model in the `lathe-health` KV
//! bucket (`lathe models` and `lathe monitor <model>` read it).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::ModelName;
use crate::messages::Alert;

fn v1() -> u32 {
    crate::SCHEMA_VERSION
}

/// A model's health over the monitor's last window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelHealth {
    #[serde(default = "v1")]
    pub schema_version: u32,
    pub model: ModelName,
    pub at_ms: u64,
    pub window_secs: u32,
    /// The versions that served in the window (active and canary first).
    pub versions: Vec<VersionHealth>,
    /// The latest alerts, newest last (at most 20).
    #[serde(default)]
    pub recent_alerts: Vec<Alert>,
}

/// Whether a version keeps to its model's policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Healthy,
    /// A policy is breached (see the alerts).
    Breach,
    /// No requests in the window.
    Idle,
}

/// One version's figures over the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VersionHealth {
    pub version: u32,
    /// `active`, `canary` or `retired`.
    pub role: String,
    pub status: HealthStatus,
    pub requests: u64,
    pub rows: u64,
    pub requests_per_sec: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub error_rate: f64,
    /// Accuracy on the rows whose labels came back as feedback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    pub labelled_rows: u64,
    /// Share of each predicted class, in class order.
    #[serde(default)]
    pub predicted_share: Vec<f64>,
    /// PSI of the predicted-class mix against the training split's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_psi: Option<f64>,
    /// Sampled input rows the drift figures rest on.
    pub sampled_rows: u64,
    /// Features whose PSI is over the policy's level, worst first.
    #[serde(default)]
    pub drifted: Vec<FeatureDrift>,
    /// The largest feature PSI in the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_feature_psi: Option<f64>,
}

/// One feature's drift.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FeatureDrift {
    pub feature: String,
    pub index: u32,
    pub psi: f64,
    /// Kolmogorov–Smirnov statistic and p-value, for small samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ks: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ks_p_value: Option<f64>,
}
