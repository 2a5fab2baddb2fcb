//! Continuous monitoring: every replica follows `lathe.telemetry.*` and `lathe.feedback.*`,
//! keeps a rolling window per model version, and on every tick judges each model against
//! the policy its last monitored job attached: it writes the model's health to the
//! `lathe-health` bucket, raises alerts on `lathe.alerts.<model>` (stored in `LATHE_ALERTS`,
//! deduplicated by id so that replicas do not repeat each other) and as events of the
//! deploying job, promotes a canary that stayed healthy for its window, rolls back a canary
//! or an active version that breaks latency, error-rate or accuracy limits, and resubmits
//! the training job when drift persists (`retrain_on_drift`).
//!
//! Registry actions are compare-and-set with a precondition (the canary or active version
//! is still the one judged), so two replicas acting on the same window change it once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt;
use lathe_model::Artifact;
use lathe_proto::health::ModelHealth;
use lathe_proto::registry::{ModelEntry, ModelVersion, RegistryError};
use lathe_proto::spec::MonitorParams;
use lathe_proto::{
    Alert, AlertKind, EventKind, Feedback, ModelName, TelemetryBatch, codec, names, now_ms,
};
use lathe_runtime::events::EventBuilder;
use lathe_runtime::{Resources, RuntimeError};
use tokio_util::sync::CancellationToken;

use crate::window::{Breach, ModelReference, VersionWindow};

/// A monitor replica's settings, from the environment.
#[derive(Clone, Debug)]
pub struct MonitorSettings {
    /// How often every model is judged (`LATHE_MONITOR_TICK_MS`, default 1000).
    pub tick: Duration,
    /// How long the smoke test waits for the new version to answer
    /// (`LATHE_SMOKE_TIMEOUT_SECS`, default 30).
    pub smoke_timeout: Duration,
    /// This replica's name in registry history.
    pub replica: String,
}

impl Default for MonitorSettings {
    fn default() -> Self {
        MonitorSettings {
            tick: Duration::from_millis(1000),
            smoke_timeout: Duration::from_secs(30),
            replica: lathe_runtime::worker_id(),
        }
    }
}

impl MonitorSettings {
    pub fn from_env() -> Result<Self, RuntimeError> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        let mut s = MonitorSettings::default();
        let num = |name: &'static str, v: String| -> Result<u64, RuntimeError> {
            v.trim()
                .parse::<u64>()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or(RuntimeError::Setting {
                    name,
                    reason: format!("`{v}` is not a whole number >= 1"),
                })
        };
        if let Some(v) = var("LATHE_MONITOR_TICK_MS") {
            s.tick = Duration::from_millis(num("LATHE_MONITOR_TICK_MS", v)?);
        }
        if let Some(v) = var("LATHE_SMOKE_TIMEOUT_SECS") {
            s.smoke_timeout = Duration::from_secs(num("LATHE_SMOKE_TIMEOUT_SECS", v)?);
        }
        if let Some(v) = var("LATHE_WORKER_ID") {
            s.replica = v;
        }
        Ok(s)
    }
}

/// The policy every model is shown against until a job attaches one (figures only: no
/// alert and no action without an attached policy).
pub fn default_policy() -> MonitorParams {
    MonitorParams::default()
}

/// Requests waiting for feedback, by model and request id.
struct Pending {
    version: u32,
    predicted: Vec<u32>,
    at_ms: u64,
}

#[derive(Default)]
struct ModelState {
    versions: HashMap<u32, VersionWindow>,
    /// Since when each version has drifted without a break.
    drift_since: HashMap<u32, u64>,
    retrained: HashSet<u32>,
    recent_alerts: VecDeque<Alert>,
}

#[derive(Default)]
struct State {
    models: HashMap<ModelName, ModelState>,
    pending: HashMap<(ModelName, String), Pending>,
    /// Feedback whose request has not been seen yet (telemetry is batched): retried.
    unmatched: VecDeque<(ModelName, Feedback, u64)>,
    sent_alerts: HashSet<String>,
    bad_messages: u64,
}

struct Inner {
    res: Resources,
    settings: MonitorSettings,
    state: Mutex<State>,
    references: Mutex<HashMap<String, Arc<ModelReference>>>,
    by_version: Mutex<HashMap<(ModelName, u32), Arc<ModelReference>>>,
}

/// A monitor replica's watching side; cheap to clone.
#[derive(Clone)]
pub struct Watcher {
    inner: Arc<Inner>,
}

impl Watcher {
    pub fn new(res: Resources, settings: MonitorSettings) -> Self {
        Watcher {
            inner: Arc::new(Inner {
                res,
                settings,
                state: Mutex::new(State::default()),
                references: Mutex::new(HashMap::new()),
                by_version: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages that could not be read (a flood of garbage must not stop the monitor).
    pub fn bad_messages(&self) -> u64 {
        self.state().bad_messages
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let client = self.inner.res.client.clone();
        let mut telemetry = client
            .subscribe(names::TELEMETRY_SUBJECTS)
            .await
            .map_err(|e| RuntimeError::nats("subscribe to telemetry", e))?;
        let mut feedback = client
            .subscribe(names::FEEDBACK_SUBJECTS)
            .await
            .map_err(|e| RuntimeError::nats("subscribe to feedback", e))?;
        let mut tick = tokio::time::interval(self.inner.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!("Monitoring lathe.telemetry.* and lathe.feedback.*");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                m = telemetry.next() => match m {
                    Some(m) => self.on_telemetry(&m.payload),
                    None => break,
                },
                m = feedback.next() => match m {
                    Some(m) => {
                        let ct = m.headers.as_ref().and_then(|h| h.get("Content-Type")).map(|v| v.as_str().to_string());
                        let model = m.subject.strip_prefix("lathe.feedback.").unwrap_or("").to_string();
                        self.on_feedback(&model, &m.payload, ct.as_deref()).await;
                    }
                    None => break,
                },
                _ = tick.tick() => self.evaluate_all().await,
            }
        }
        Ok(())
    }

    fn on_telemetry(&self, payload: &[u8]) {
        let batch: TelemetryBatch = match codec::from_msgpack(payload) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "Unreadable telemetry");
                self.state().bad_messages += 1;
                return;
            }
        };
        let mut st = self.state();
        for r in &batch.records {
            if r.model != batch.model {
                continue;
            }
            if let Some(id) = &r.request_id
                && r.error.is_none()
            {
                st.pending.insert(
                    (r.model.clone(), id.clone()),
                    Pending {
                        version: r.version,
                        predicted: r.predicted.clone(),
                        at_ms: r.at_ms,
                    },
                );
            }
            st.models
                .entry(r.model.clone())
                .or_default()
                .versions
                .entry(r.version)
                .or_default()
                .push(r);
        }
    }

    async fn on_feedback(&self, model: &str, payload: &[u8], content_type: Option<&str>) {
        let (Ok(model), Ok(fb)) = (
            model.parse::<ModelName>(),
            codec::decode_any::<Feedback>(payload, content_type),
        ) else {
            tracing::debug!(%model, "Unreadable feedback");
            self.state().bad_messages += 1;
            return;
        };
        if !self.apply_feedback(&model, &fb).await {
            self.state().unmatched.push_back((model, fb, now_ms()));
        }
    }

    /// Scores feedback against the prediction it is about; false when that prediction has
    /// not been seen (yet).
    async fn apply_feedback(&self, model: &ModelName, fb: &Feedback) -> bool {
        let Some((version, predicted)) = self
            .state()
            .pending
            .get(&(model.clone(), fb.request_id.clone()))
            .map(|p| (p.version, p.predicted.clone()))
        else {
            return false;
        };
        let Some(reference) = self.reference_of(model, version).await else {
            return false;
        };
        let mut correct = 0;
        let mut total = 0;
        for (label, &class) in fb.labels.iter().zip(&predicted) {
            total += 1;
            if reference.class_labels.get(class as usize) == Some(label) {
                correct += 1;
            }
        }
        let mut st = self.state();
        st.pending.remove(&(model.clone(), fb.request_id.clone()));
        st.models
            .entry(model.clone())
            .or_default()
            .versions
            .entry(version)
            .or_default()
            .push_labels(now_ms(), correct, total);
        true
    }

    /// The training reference and labels of a model version. A version's artifact never
    /// changes, so once found it is kept by `(model, version)`: feedback does not read the
    /// registry per message.
    async fn reference_of(&self, model: &ModelName, version: u32) -> Option<Arc<ModelReference>> {
        let key = (model.clone(), version);
        if let Some(r) = self
            .inner
            .by_version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Some(r.clone());
        }
        let (entry, _) = self.inner.res.registry.get(model).await.ok()??;
        let v = entry.version(version)?.clone();
        let r = self.reference_for(&v).await?;
        self.inner
            .by_version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, r.clone());
        Some(r)
    }

    async fn reference_for(&self, v: &ModelVersion) -> Option<Arc<ModelReference>> {
        if let Some(r) = self
            .inner
            .references
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&v.artifact.digest)
        {
            return Some(r.clone());
        }
        let bytes = match self.inner.res.artifacts.get(&v.artifact).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(version = v.version, error = %e, "Cannot read a version's artifact");
                return None;
            }
        };
        let artifact = match Artifact::from_bytes(&bytes) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(version = v.version, error = %e, "Unreadable artifact");
                return None;
            }
        };
        let r = Arc::new(ModelReference {
            feature_names: artifact.feature_names.clone(),
            class_labels: artifact.class_labels.clone(),
            drift: artifact.drift_reference().clone(),
        });
        self.inner
            .references
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(v.artifact.digest.clone(), r.clone());
        Some(r)
    }

    async fn evaluate_all(&self) {
        // Retry feedback that came before its telemetry; drop it after a minute.
        let unmatched: Vec<_> = self.state().unmatched.drain(..).collect();
        for (model, fb, at) in unmatched {
            if !self.apply_feedback(&model, &fb).await && now_ms() - at < 60_000 {
                self.state().unmatched.push_back((model, fb, at));
            }
        }
        let models: Vec<ModelName> = self.state().models.keys().cloned().collect();
        for model in models {
            if let Err(e) = self.evaluate(&model).await {
                tracing::warn!(%model, error = %e, "Cannot judge a model");
            }
        }
        let mut st = self.state();
        let cut = now_ms().saturating_sub(600_000);
        st.pending.retain(|_, p| p.at_ms >= cut);
        if st.sent_alerts.len() > 10_000 {
            st.sent_alerts.clear();
        }
    }

    async fn evaluate(&self, model: &ModelName) -> Result<(), RuntimeError> {
        let Some((entry, _)) = self.inner.res.registry.get(model).await? else {
            return Ok(());
        };
        let policy = entry.policy.clone();
        let judged_by = policy.clone().unwrap_or_else(default_policy);
        let now = now_ms();
        let window_ms = u64::from(judged_by.window_secs) * 1000;
        let mut versions: Vec<u32> = {
            let mut st = self.state();
            let ms = st.models.entry(model.clone()).or_default();
            for w in ms.versions.values_mut() {
                w.prune(now, window_ms);
            }
            ms.versions.retain(|_, w| !w.is_empty());
            ms.versions.keys().copied().collect()
        };
        for (v, _) in entry.serving() {
            if !versions.contains(&v) {
                versions.push(v);
            }
        }
        versions.sort_unstable();
        let mut health = Vec::new();
        let mut judged: Vec<(u32, String, Vec<Breach>, u64)> = Vec::new();
        for version in versions {
            let role = if entry.canary.as_ref().is_some_and(|c| c.version == version) {
                "canary"
            } else if entry.active == Some(version) {
                "active"
            } else {
                "retired"
            };
            let reference = match entry.version(version) {
                Some(v) => self.reference_for(v).await,
                None => None,
            };
            let window = self
                .state()
                .models
                .get(model)
                .and_then(|m| m.versions.get(&version).cloned())
                .unwrap_or_default();
            let (h, breaches) = window.judge(version, role, reference.as_deref(), &judged_by, now);
            judged.push((version, role.to_string(), breaches, window.requests()));
            health.push(h);
        }
        health.sort_by_key(|h| match h.role.as_str() {
            "active" => 0,
            "canary" => 1,
            _ => 2,
        });
        if let Some(policy) = &policy {
            for (version, role, breaches, requests) in &judged {
                self.act(&entry, policy, *version, role, breaches, *requests, now)
                    .await;
            }
        }
        let recent: Vec<Alert> = self
            .state()
            .models
            .get(model)
            .map(|m| m.recent_alerts.iter().cloned().collect())
            .unwrap_or_default();
        let h = ModelHealth {
            schema_version: lathe_proto::SCHEMA_VERSION,
            model: model.clone(),
            at_ms: now,
            window_secs: judged_by.window_secs,
            versions: health,
            recent_alerts: recent,
        };
        crate::metrics::record(&h);
        if let Err(e) = self
            .inner
            .res
            .health
            .put(model.as_str(), codec::to_msgpack(&h).into())
            .await
        {
            tracing::warn!(%model, error = %e, "Cannot write model health");
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn act(
        &self,
        entry: &ModelEntry,
        policy: &MonitorParams,
        version: u32,
        role: &str,
        breaches: &[Breach],
        requests: u64,
        now: u64,
    ) {
        if role == "retired" {
            return;
        }
        let model = &entry.model;
        let slot = now / (u64::from(policy.window_secs).max(1) * 1000);
        for b in breaches {
            self.alert(
                entry,
                version,
                b.kind,
                b.figure,
                b.threshold,
                &b.message,
                &b.features,
                &format!("{}:{slot}", kind_name(b.kind)),
                policy,
            )
            .await;
        }
        let unfit: Vec<&Breach> = breaches.iter().filter(|b| b.unfit()).collect();
        let by = format!("lathe-monitor {}", self.inner.settings.replica);
        if !unfit.is_empty() && policy.auto_rollback {
            let why = unfit
                .iter()
                .map(|b| b.message.clone())
                .collect::<Vec<_>>()
                .join("; ");
            let canary = role == "canary";
            let result = self
                .inner
                .res
                .registry
                .update(model, false, |e| {
                    if canary {
                        if e.canary.as_ref().map(|c| c.version) != Some(version) {
                            return Err(already(model));
                        }
                        e.rollback(None, &by, &why)
                    } else {
                        if e.active != Some(version) || e.canary.is_some() {
                            return Err(already(model));
                        }
                        e.rollback(None, &by, &why)
                    }
                })
                .await;
            match result {
                Ok((_, active)) => {
                    let msg = if canary {
                        format!("canary v{version} rolled back, v{active} keeps all traffic: {why}")
                    } else {
                        format!("v{version} rolled back to v{active}: {why}")
                    };
                    tracing::warn!(%model, version, "{msg}");
                    let figure = unfit[0].figure;
                    let threshold = unfit[0].threshold;
                    self.alert(
                        entry,
                        version,
                        AlertKind::Rollback,
                        figure,
                        threshold,
                        &msg,
                        &[],
                        "rollback",
                        policy,
                    )
                    .await;
                }
                Err(e) => tracing::debug!(%model, version, error = %e, "No rollback"),
            }
        }
        // A canary that kept to the policy for its whole window is promoted.
        if role == "canary"
            && unfit.is_empty()
            && requests >= crate::window::MIN_REQUESTS
            && let Some(c) = &entry.canary
            && now.saturating_sub(c.since_ms) >= u64::from(policy.canary_window_secs) * 1000
        {
            let why = format!(
                "healthy for {} s as a {}% canary ({requests} requests in the last window)",
                policy.canary_window_secs, c.percent
            );
            let result = self
                .inner
                .res
                .registry
                .update(model, false, |e| {
                    if e.canary.as_ref().map(|c| c.version) != Some(version) {
                        return Err(already(model));
                    }
                    e.promote(version, &by, &why)
                })
                .await;
            if result.is_ok() {
                let msg = format!("canary v{version} promoted: {why}");
                tracing::info!(%model, version, "{msg}");
                self.alert(
                    entry,
                    version,
                    AlertKind::Promotion,
                    requests as f64,
                    crate::window::MIN_REQUESTS as f64,
                    &msg,
                    &[],
                    "promotion",
                    policy,
                )
                .await;
            }
        }
        // Persistent drift: drifted through a whole window.
        let drifted = breaches
            .iter()
            .any(|b| matches!(b.kind, AlertKind::FeatureDrift | AlertKind::PredictionDrift));
        let resubmit = {
            let mut st = self.state();
            let ms = st.models.entry(model.clone()).or_default();
            if drifted {
                let since = *ms.drift_since.entry(version).or_insert(now);
                policy.retrain_on_drift
                    && role == "active"
                    && now.saturating_sub(since) >= u64::from(policy.window_secs) * 1000
                    && ms.retrained.insert(version)
            } else {
                ms.drift_since.remove(&version);
                false
            }
        };
        if resubmit && let Some(v) = entry.version(version) {
            self.retrain(entry, v, policy).await;
        }
    }

    /// Resubmits the job that trained `v`, with a fresh job id.
    async fn retrain(&self, entry: &ModelEntry, v: &ModelVersion, policy: &MonitorParams) {
        let spec = match self.inner.res.jobs.get(v.job_id).await {
            Ok(Some((r, _))) => r.spec,
            _ => None,
        };
        let Some(spec) = spec else {
            tracing::warn!(model = %entry.model, "Cannot retrain: the deploying job's spec is gone");
            return;
        };
        let job = lathe_proto::JobId::new();
        let mut headers = HeaderMap::new();
        headers.insert(names::JOB_ID_HEADER, job.to_string().as_str());
        let sent = self
            .inner
            .res
            .client
            .publish_with_headers(names::SUBMIT_SUBJECT, headers, codec::to_json(&spec).into())
            .await;
        if sent.is_ok() {
            let msg = format!(
                "drift persisted for {} s: retraining as job {job}",
                policy.window_secs
            );
            self.alert(
                entry,
                v.version,
                AlertKind::FeatureDrift,
                0.0,
                policy.drift_psi,
                &msg,
                &[],
                "retrain",
                policy,
            )
            .await;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn alert(
        &self,
        entry: &ModelEntry,
        version: u32,
        kind: AlertKind,
        figure: f64,
        threshold: f64,
        message: &str,
        features: &[String],
        key: &str,
        policy: &MonitorParams,
    ) {
        let model = &entry.model;
        let id = format!("{model}:{version}:{key}");
        if !self.state().sent_alerts.insert(id.clone()) {
            return;
        }
        let alert = Alert {
            schema_version: lathe_proto::SCHEMA_VERSION,
            model: model.clone(),
            version,
            kind,
            figure,
            threshold,
            window_secs: policy.window_secs,
            at_ms: now_ms(),
            message: message.to_string(),
            features: features.to_vec(),
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        headers.insert("Content-Type", "application/json");
        match self
            .inner
            .res
            .js
            .publish_with_headers(
                names::alerts_subject(model),
                headers,
                codec::to_json(&alert).into(),
            )
            .await
        {
            Ok(ack) => {
                if let Err(e) = ack.await {
                    tracing::warn!(%model, error = %e, "Alert not stored");
                }
            }
            Err(e) => tracing::warn!(%model, error = %e, "Alert not published"),
        }
        if let Some(v) = entry.version(version) {
            self.inner
                .res
                .events
                .emit(EventBuilder::new(
                    v.job_id,
                    EventKind::Alert,
                    format!("{model}: {message}"),
                ))
                .await;
        }
        let mut st = self.state();
        let ms = st.models.entry(model.clone()).or_default();
        ms.recent_alerts.push_back(alert);
        while ms.recent_alerts.len() > 20 {
            ms.recent_alerts.pop_front();
        }
    }
}

fn already(model: &ModelName) -> RegistryError {
    RegistryError::Refused {
        model: model.to_string(),
        reason: "already changed".into(),
    }
}

fn kind_name(k: AlertKind) -> &'static str {
    match k {
        AlertKind::Latency => "latency",
        AlertKind::ErrorRate => "error_rate",
        AlertKind::Accuracy => "accuracy",
        AlertKind::FeatureDrift => "feature_drift",
        AlertKind::PredictionDrift => "prediction_drift",
        AlertKind::Rollback => "rollback",
        AlertKind::Promotion => "promotion",
    }
}
