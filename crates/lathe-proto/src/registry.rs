//! The model registry: one entry per model name in the `lathe-models` KV bucket, holding
//! every deployed version, which one is active, the canary and its share of traffic, the
//! monitoring policy, and the history of every promotion and rollback.
//!
//! The transitions are pure functions on [`ModelEntry`] so that the deployer, the monitor
//! and the CLI apply exactly the same rules; the runtime wraps them in compare-and-set.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{JobId, ModelName};
use crate::messages::ArtifactRef;
use crate::spec::{DeployStrategy, MonitorParams};

fn v1() -> u32 {
    crate::SCHEMA_VERSION
}

/// The registry entry of one model (`lathe-models/<model>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelEntry {
    #[serde(default = "v1")]
    pub schema_version: u32,
    pub model: ModelName,
    /// Every registered version, oldest first; versions are numbered from 1.
    #[serde(default)]
    pub versions: Vec<ModelVersion>,
    /// The version that takes the traffic the canary does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Canary>,
    /// The monitoring policy the last monitored job attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<MonitorParams>,
    /// Every change, oldest first.
    #[serde(default)]
    pub history: Vec<RegistryChange>,
}

/// One deployed model version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelVersion {
    pub version: u32,
    /// The job (and its step) that deployed it: a redelivered deploy task finds its version
    /// by this pair instead of registering a second one.
    pub job_id: JobId,
    pub step: u32,
    pub artifact: ArtifactRef,
    pub created_at_ms: u64,
    /// What the deploy step measured (test accuracy, p99 latency, …).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// The stages that produced the artifact, oldest first, each with its headline figures.
    #[serde(default)]
    pub lineage: Vec<LineageStep>,
}

/// One stage of a version's lineage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LineageStep {
    pub stage: String,
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
}

/// A version taking a share of the traffic until the monitor promotes or rolls it back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Canary {
    pub version: u32,
    /// Share of requests, in (0, 100).
    pub percent: f64,
    pub since_ms: u64,
}

/// What a registry change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A version became active on deploy (`replace`).
    Activate,
    /// A version started as a canary.
    Canary,
    /// A version was promoted to active (a canary that stayed healthy, or by hand).
    Promote,
    /// Traffic went back to an earlier version (or a canary was withdrawn).
    Rollback,
    /// A version was forgotten (`lathe gc --keep-versions`): it left the registry, and its
    /// artifact goes with the next collection.
    Forget,
    /// A monitoring policy was attached.
    Policy,
}

/// One entry of a model's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RegistryChange {
    pub at_ms: u64,
    pub kind: ChangeKind,
    /// The version the change is about.
    pub version: u32,
    /// The active version before the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_active: Option<u32>,
    /// Who made it: a service instance, or `cli`.
    pub by: String,
    pub reason: String,
}

/// Why a registry change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("model `{0}` is not in the registry")]
    UnknownModel(String),
    #[error("model `{model}` has no version {version} (versions: {known})")]
    UnknownVersion {
        model: String,
        version: u32,
        known: String,
    },
    #[error("model `{model}`: {reason}")]
    Refused { model: String, reason: String },
}

/// What a deploy asks the registry for.
#[derive(Clone, Debug, PartialEq)]
pub struct NewVersion {
    pub job_id: JobId,
    pub step: u32,
    pub artifact: ArtifactRef,
    pub metrics: BTreeMap<String, f64>,
    pub lineage: Vec<LineageStep>,
    pub strategy: DeployStrategy,
    pub canary_percent: f64,
}

impl ModelEntry {
    pub fn new(model: ModelName) -> Self {
        ModelEntry {
            schema_version: crate::SCHEMA_VERSION,
            model,
            versions: Vec::new(),
            active: None,
            canary: None,
            policy: None,
            history: Vec::new(),
        }
    }

    pub fn version(&self, version: u32) -> Option<&ModelVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// The version a job's step registered, if it did.
    pub fn version_of_job(&self, job_id: JobId, step: u32) -> Option<&ModelVersion> {
        self.versions
            .iter()
            .find(|v| v.job_id == job_id && v.step == step)
    }

    fn known(&self) -> String {
        if self.versions.is_empty() {
            return "none".into();
        }
        self.versions
            .iter()
            .map(|v| v.version.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn check_version(&self, version: u32) -> Result<(), RegistryError> {
        if self.version(version).is_none() {
            return Err(RegistryError::UnknownVersion {
                model: self.model.to_string(),
                version,
                known: self.known(),
            });
        }
        Ok(())
    }

    fn record(
        &mut self,
        kind: ChangeKind,
        version: u32,
        previous: Option<u32>,
        by: &str,
        why: &str,
    ) {
        self.history.push(RegistryChange {
            at_ms: crate::now_ms(),
            kind,
            version,
            previous_active: previous,
            by: by.to_string(),
            reason: why.to_string(),
        });
    }

    /// Registers a deployed version and routes traffic to it by its strategy: `replace`
    /// makes it active; `canary` gives it `canary_percent` of the requests (the first
    /// version of a model has nothing to share with and becomes active). Returns the version
    /// number and whether it is new: the same job step registers at most one version.
    pub fn register(&mut self, new: NewVersion, by: &str) -> (u32, bool) {
        if let Some(v) = self.version_of_job(new.job_id, new.step) {
            return (v.version, false);
        }
        // Numbers are never reused, not even a forgotten version's (its number stays in the
        // history): a replica that loaded version n must never meet another version n.
        let version = self
            .versions
            .iter()
            .map(|v| v.version)
            .chain(self.history.iter().map(|c| c.version))
            .max()
            .unwrap_or(0)
            + 1;
        let job = new.job_id;
        self.versions.push(ModelVersion {
            version,
            job_id: new.job_id,
            step: new.step,
            artifact: new.artifact,
            created_at_ms: crate::now_ms(),
            metrics: new.metrics,
            lineage: new.lineage,
        });
        let previous = self.active;
        match (new.strategy, previous) {
            (DeployStrategy::Canary, Some(_)) => {
                // A canary replaces an earlier canary: only one is measured at a time.
                self.canary = Some(Canary {
                    version,
                    percent: new.canary_percent,
                    since_ms: crate::now_ms(),
                });
                let why = format!("deployed by job {job} as a {}% canary", new.canary_percent);
                self.record(ChangeKind::Canary, version, previous, by, &why);
            }
            (strategy, _) => {
                self.active = Some(version);
                self.canary = None;
                let why = match strategy {
                    DeployStrategy::Replace => format!("deployed by job {job}"),
                    DeployStrategy::Canary => {
                        format!("deployed by job {job}; first version, so active at once")
                    }
                };
                self.record(ChangeKind::Activate, version, previous, by, &why);
            }
        }
        (version, true)
    }

    /// Makes `version` active; a canary of that version ends.
    pub fn promote(&mut self, version: u32, by: &str, why: &str) -> Result<(), RegistryError> {
        self.check_version(version)?;
        let previous = self.active;
        self.active = Some(version);
        if self.canary.as_ref().is_some_and(|c| c.version == version) {
            self.canary = None;
        }
        self.record(ChangeKind::Promote, version, previous, by, why);
        Ok(())
    }

    /// Sends traffic back: a canary is withdrawn (the active version keeps all traffic);
    /// without one, the active version is replaced by `to`, or by the version that was
    /// active before it. Returns the version now active.
    pub fn rollback(&mut self, to: Option<u32>, by: &str, why: &str) -> Result<u32, RegistryError> {
        let model = self.model.to_string();
        if to.is_none()
            && let Some(c) = self.canary.take()
        {
            let active = self.active.ok_or_else(|| RegistryError::Refused {
                model: model.clone(),
                reason: "a canary without an active version".into(),
            })?;
            self.record(ChangeKind::Rollback, c.version, Some(active), by, why);
            return Ok(active);
        }
        let current = self.active.ok_or_else(|| RegistryError::Refused {
            model: model.clone(),
            reason: "no active version to roll back".into(),
        })?;
        let target = match to {
            Some(v) => {
                self.check_version(v)?;
                v
            }
            None => self
                .previous_active(current)
                .ok_or_else(|| RegistryError::Refused {
                    model: model.clone(),
                    reason: format!("version {current} has no earlier active version to return to"),
                })?,
        };
        if target == current {
            return Err(RegistryError::Refused {
                model,
                reason: format!("version {current} is already active"),
            });
        }
        self.canary = None;
        self.active = Some(target);
        self.record(ChangeKind::Rollback, target, Some(current), by, why);
        Ok(target)
    }

    /// The version that was active just before `current` last became active.
    fn previous_active(&self, current: u32) -> Option<u32> {
        self.history
            .iter()
            .rev()
            .find(|c| {
                c.version == current
                    && matches!(
                        c.kind,
                        ChangeKind::Activate | ChangeKind::Promote | ChangeKind::Rollback
                    )
            })
            .and_then(|c| c.previous_active)
            .filter(|&v| v != current)
    }

    /// Forgets old versions: keeps the active version, the canary, the version a rollback
    /// of the active one returns to, and the `keep` newest others; the rest leave
    /// `versions` (each forgetting is recorded in the history). Returns what was forgotten.
    pub fn forget_old_versions(&mut self, keep: usize, by: &str) -> Vec<ModelVersion> {
        let mut pinned = std::collections::BTreeSet::new();
        if let Some(active) = self.active {
            pinned.insert(active);
            pinned.extend(self.previous_active(active));
        }
        pinned.extend(self.canary.as_ref().map(|c| c.version));
        let mut others: Vec<u32> = self
            .versions
            .iter()
            .map(|v| v.version)
            .filter(|v| !pinned.contains(v))
            .collect();
        others.sort_unstable_by(|a, b| b.cmp(a));
        let forget: std::collections::BTreeSet<u32> = others.into_iter().skip(keep).collect();
        if forget.is_empty() {
            return Vec::new();
        }
        let (gone, kept): (Vec<ModelVersion>, Vec<ModelVersion>) =
            std::mem::take(&mut self.versions)
                .into_iter()
                .partition(|v| forget.contains(&v.version));
        self.versions = kept;
        let why = format!("older than the {keep} newest versions kept");
        for v in &gone {
            self.record(ChangeKind::Forget, v.version, self.active, by, &why);
        }
        gone
    }

    /// Attaches a monitoring policy.
    pub fn attach_policy(&mut self, policy: MonitorParams, version: u32, by: &str) {
        self.policy = Some(policy);
        self.record(
            ChangeKind::Policy,
            version,
            self.active,
            by,
            "monitoring policy attached",
        );
    }

    /// The versions that serve traffic now: `(version, share of requests in percent)`.
    pub fn serving(&self) -> Vec<(u32, f64)> {
        let mut out = Vec::new();
        match (&self.active, &self.canary) {
            (Some(a), Some(c)) => {
                out.push((*a, 100.0 - c.percent));
                out.push((c.version, c.percent));
            }
            (Some(a), None) => out.push((*a, 100.0)),
            (None, Some(c)) => out.push((c.version, 100.0)),
            (None, None) => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_version(job: JobId, strategy: DeployStrategy) -> NewVersion {
        NewVersion {
            job_id: job,
            step: 1,
            artifact: ArtifactRef {
                bucket: "lathe-artifacts".into(),
                name: format!("{job}/0-train"),
                digest: "SHA-256=x".into(),
                bytes: 10,
            },
            metrics: BTreeMap::new(),
            lineage: Vec::new(),
            strategy,
            canary_percent: 10.0,
        }
    }

    fn entry() -> ModelEntry {
        ModelEntry::new("digits".parse().unwrap())
    }

    #[test]
    fn a_job_step_registers_one_version() {
        let mut e = entry();
        let job = JobId::new();
        assert_eq!(
            e.register(new_version(job, DeployStrategy::Replace), "t"),
            (1, true)
        );
        assert_eq!(
            e.register(new_version(job, DeployStrategy::Replace), "t"),
            (1, false)
        );
        assert_eq!(e.versions.len(), 1);
        assert_eq!(e.active, Some(1));
    }

    #[test]
    fn canary_then_promote_then_rollback() {
        let mut e = entry();
        // The first version of a model becomes active even when asked to be a canary.
        e.register(new_version(JobId::new(), DeployStrategy::Canary), "t");
        assert_eq!((e.active, e.canary.is_none()), (Some(1), true));
        e.register(new_version(JobId::new(), DeployStrategy::Canary), "t");
        assert_eq!(e.serving(), vec![(1, 90.0), (2, 10.0)]);
        // Rolling back a canary withdraws it; the active version keeps serving.
        assert_eq!(e.rollback(None, "t", "slow").unwrap(), 1);
        assert_eq!(e.serving(), vec![(1, 100.0)]);
        e.promote(2, "t", "by hand").unwrap();
        assert_eq!(e.active, Some(2));
        // Without a canary, rollback returns to the version active before.
        assert_eq!(e.rollback(None, "t", "bad").unwrap(), 1);
        assert_eq!(e.active, Some(1));
        assert!(matches!(
            e.promote(9, "t", "x"),
            Err(RegistryError::UnknownVersion { version: 9, .. })
        ));
        assert!(e.rollback(Some(1), "t", "x").is_err(), "already active");
        assert_eq!(e.rollback(Some(2), "t", "x").unwrap(), 2);
    }

    #[test]
    fn forgetting_keeps_what_serves_and_what_a_rollback_needs() {
        let mut e = entry();
        for _ in 0..5 {
            e.register(new_version(JobId::new(), DeployStrategy::Replace), "t");
        }
        // 6 is a canary; 5 is active, and a rollback of it returns to 4.
        e.register(new_version(JobId::new(), DeployStrategy::Canary), "t");
        assert_eq!(
            (e.active, e.canary.as_ref().map(|c| c.version)),
            (Some(5), Some(6))
        );
        let gone: Vec<u32> = e
            .forget_old_versions(1, "gc")
            .iter()
            .map(|v| v.version)
            .collect();
        // Of 1, 2 and 3 the newest stays.
        assert_eq!(gone, vec![1, 2]);
        let kept: Vec<u32> = e.versions.iter().map(|v| v.version).collect();
        assert_eq!(kept, vec![3, 4, 5, 6]);
        assert_eq!(e.serving(), vec![(5, 90.0), (6, 10.0)]);
        assert!(
            e.forget_old_versions(1, "gc").is_empty(),
            "nothing more to forget"
        );
        let forgets: Vec<u32> = e
            .history
            .iter()
            .filter(|c| c.kind == ChangeKind::Forget)
            .map(|c| c.version)
            .collect();
        assert_eq!(forgets, vec![1, 2]);

        // Keeping none: only the canary, the active version and its rollback target stay.
        let gone: Vec<u32> = e
            .forget_old_versions(0, "gc")
            .iter()
            .map(|v| v.version)
            .collect();
        assert_eq!(gone, vec![3]);
        assert_eq!(e.rollback(None, "t", "slow").unwrap(), 5, "the canary goes");
        assert_eq!(e.rollback(None, "t", "bad").unwrap(), 4);
        assert!(matches!(
            e.rollback(Some(1), "t", "x"),
            Err(RegistryError::UnknownVersion { version: 1, .. })
        ));

        // The withdrawn canary, the newest version, is forgotten; its number is not reused.
        e.forget_old_versions(0, "gc");
        assert!(e.version(6).is_none());
        assert_eq!(
            e.register(new_version(JobId::new(), DeployStrategy::Replace), "t"),
            (7, true)
        );
    }

    #[test]
    fn rollback_of_a_first_version_is_refused() {
        let mut e = entry();
        e.register(new_version(JobId::new(), DeployStrategy::Replace), "t");
        let err = e.rollback(None, "t", "x").unwrap_err();
        assert!(
            err.to_string().contains("no earlier active version"),
            "{err}"
        );
    }
}
