//! The serving side of a deployer replica: it watches the registry, loads the versions that
//! take traffic (active and canary, cached by digest, loaded *before* they are routed to),
//! answers `lathe.infer.<model>` as a NATS service in the `lathe-deployer` queue group (so
//! replicas share the load, discoverable with `$SRV.PING/INFO/STATS`), splits canary traffic
//! by its weight, and sends a telemetry record of every request, batched, on
//! `lathe.telemetry.<model>` for the monitor.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::client::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::service::ServiceExt;
use futures::StreamExt;
use lathe_model::{Artifact, Engine};
use lathe_proto::registry::ModelEntry;
use lathe_proto::{JobId, ModelName, TelemetryBatch, TelemetryRecord, codec, names, now_ms};
use lathe_runtime::registry::Registry;
use lathe_runtime::{Resources, RuntimeError, trace};
use tokio_util::sync::CancellationToken;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::request::{self, InferError, Limits};

/// The queue group every replica's endpoint joins.
pub const QUEUE_GROUP: &str = "lathe-deployer";
/// The NATS service name (`$SRV.*.lathe-deployer`).
pub const SERVICE_NAME: &str = "lathe-deployer";
/// Telemetry records buffered between flushes before new ones are dropped (and counted).
const MAX_BUFFERED_TELEMETRY: usize = 100_000;
/// How many first requests of a new version link their span to the deploying job's trace.
const LINKED_FIRST_REQUESTS: u32 = 5;

/// A replica's serving settings, from the environment.
#[derive(Clone, Debug)]
pub struct ServeSettings {
    /// Largest batch accepted (`LATHE_MAX_BATCH`, default 1024 rows).
    pub max_batch_rows: usize,
    /// Share of requests whose first input row is sent with the telemetry, for drift
    /// checks (`LATHE_TELEMETRY_SAMPLE`, in [0, 1], default 1).
    pub telemetry_sample: f64,
    /// How often telemetry is flushed (`LATHE_TELEMETRY_FLUSH_MS`, default 200).
    pub telemetry_flush: Duration,
    /// This replica's name in telemetry.
    pub replica: String,
    /// Test-only: `LATHE_TEST_DELAY=<version>:<ms>` makes requests answered by that version
    /// of any model wait this long, so that tests can play a slow canary.
    pub test_delay: Option<(u32, Duration)>,
}

impl Default for ServeSettings {
    fn default() -> Self {
        ServeSettings {
            max_batch_rows: 1024,
            telemetry_sample: 1.0,
            telemetry_flush: Duration::from_millis(200),
            replica: lathe_runtime::worker_id(),
            test_delay: None,
        }
    }
}

fn setting(name: &'static str, reason: String) -> RuntimeError {
    RuntimeError::Setting { name, reason }
}

impl ServeSettings {
    pub fn from_env() -> Result<Self, RuntimeError> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.trim().is_empty());
        let mut s = ServeSettings::default();
        if let Some(v) = var("LATHE_MAX_BATCH") {
            s.max_batch_rows = v
                .trim()
                .parse()
                .ok()
                .filter(|&n: &usize| n >= 1)
                .ok_or_else(|| {
                    setting("LATHE_MAX_BATCH", format!("`{v}` is not a row count >= 1"))
                })?;
        }
        if let Some(v) = var("LATHE_TELEMETRY_SAMPLE") {
            s.telemetry_sample = v
                .trim()
                .parse()
                .ok()
                .filter(|x: &f64| (0.0..=1.0).contains(x))
                .ok_or_else(|| {
                    setting(
                        "LATHE_TELEMETRY_SAMPLE",
                        format!("`{v}` is not a share in [0, 1]"),
                    )
                })?;
        }
        if let Some(v) = var("LATHE_TELEMETRY_FLUSH_MS") {
            let ms: u64 = v.trim().parse().ok().filter(|&n| n >= 1).ok_or_else(|| {
                setting(
                    "LATHE_TELEMETRY_FLUSH_MS",
                    format!("`{v}` is not milliseconds >= 1"),
                )
            })?;
            s.telemetry_flush = Duration::from_millis(ms);
        }
        if let Some(v) = var("LATHE_WORKER_ID") {
            s.replica = v;
        }
        if let Some(v) = var("LATHE_TEST_DELAY") {
            let parsed = v.split_once(':').and_then(|(a, b)| {
                Some((
                    a.trim().parse().ok()?,
                    Duration::from_millis(b.trim().parse().ok()?),
                ))
            });
            s.test_delay = Some(parsed.ok_or_else(|| {
                setting(
                    "LATHE_TEST_DELAY",
                    format!("`{v}` is not <version>:<milliseconds>"),
                )
            })?);
        }
        Ok(s)
    }
}

/// One loaded model version.
pub struct LoadedVersion {
    pub version: u32,
    pub digest: String,
    pub job_id: JobId,
    pub engine: Arc<Engine>,
    /// Requests answered so far by this replica (the first few link to the job's trace).
    answered: AtomicU32,
}

/// Where a model's requests go: the versions serving and their share, in percent.
struct Route {
    revision: u64,
    targets: Vec<(Arc<LoadedVersion>, f64)>,
}

impl Route {
    fn pick(&self) -> &Arc<LoadedVersion> {
        if self.targets.len() == 1 {
            return &self.targets[0].0;
        }
        let mut x = rand::random::<f64>() * 100.0;
        for (v, share) in &self.targets {
            if x < *share {
                return v;
            }
            x -= share;
        }
        &self.targets[0].0
    }
}

/// What a served request gives back.
pub struct Served {
    /// The reply, which names the version that answered.
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
}

#[derive(Default)]
struct Table {
    routes: HashMap<ModelName, Arc<Route>>,
    /// Models the registry lists with a version to serve, by the revision last seen.
    wanted: HashMap<ModelName, u64>,
    /// Models whose wanted versions could not be loaded, with why.
    failed: HashMap<ModelName, String>,
}

struct Inner {
    registry: Registry,
    res: Resources,
    settings: ServeSettings,
    table: RwLock<Table>,
    cache: Mutex<HashMap<String, Arc<Engine>>>,
    /// Serialises applying registry entries, so an older one never overwrites a newer.
    apply_lock: tokio::sync::Mutex<()>,
    synced: AtomicBool,
    telemetry: Mutex<Vec<TelemetryRecord>>,
    dropped_telemetry: AtomicU64,
}

/// A replica's serving state; cheap to clone.
#[derive(Clone)]
pub struct Serving {
    inner: Arc<Inner>,
}

impl Serving {
    pub fn new(res: Resources, settings: ServeSettings) -> Self {
        Serving {
            inner: Arc::new(Inner {
                registry: res.registry.clone(),
                res,
                settings,
                table: RwLock::new(Table::default()),
                cache: Mutex::new(HashMap::new()),
                apply_lock: tokio::sync::Mutex::new(()),
                synced: AtomicBool::new(false),
                telemetry: Mutex::new(Vec::new()),
                dropped_telemetry: AtomicU64::new(0),
            }),
        }
    }

    fn table(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.inner.table.read().unwrap_or_else(|p| p.into_inner())
    }

    fn table_mut(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.inner.table.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready: the registry has been read once and every version that should take traffic
    /// is loaded.
    pub fn ready(&self) -> Result<(), String> {
        if !self.inner.synced.load(Ordering::Acquire) {
            return Err("the model registry has not been read yet".into());
        }
        let t = self.table();
        if let Some((model, why)) = t.failed.iter().next() {
            return Err(format!("model `{model}` is not loaded: {why}"));
        }
        for (model, rev) in &t.wanted {
            match t.routes.get(model) {
                Some(r) if r.revision >= *rev => {}
                _ => return Err(format!("model `{model}` is still loading")),
            }
        }
        Ok(())
    }

    /// The versions this replica routes `model`'s requests to now.
    pub fn serving_versions(&self, model: &ModelName) -> Vec<u32> {
        self.table()
            .routes
            .get(model)
            .map(|r| r.targets.iter().map(|(v, _)| v.version).collect())
            .unwrap_or_default()
    }

    /// Models served now, with the versions serving.
    pub fn served_models(&self) -> Vec<(ModelName, Vec<u32>)> {
        let t = self.table();
        let mut out: Vec<_> = t
            .routes
            .iter()
            .map(|(m, r)| {
                (
                    m.clone(),
                    r.targets.iter().map(|(v, _)| v.version).collect(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The engine answering for `model` now (its active version), for metadata.
    pub fn engine_of(&self, model: &ModelName) -> Option<Arc<Engine>> {
        self.table()
            .routes
            .get(model)
            .and_then(|r| r.targets.first().map(|(v, _)| v.engine.clone()))
    }

    /// Puts an engine the deploy step already loaded into the cache, so this replica serves
    /// the new version without loading it twice.
    pub fn preload(&self, digest: &str, engine: Arc<Engine>) {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.to_string(), engine);
    }

    async fn engine_for(
        &self,
        model: &ModelName,
        v: &lathe_proto::registry::ModelVersion,
    ) -> Result<Arc<Engine>, String> {
        let digest = &v.artifact.digest;
        if let Some(e) = self
            .inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
        {
            return Ok(e.clone());
        }
        let bytes = self
            .inner
            .res
            .artifacts
            .get(&v.artifact)
            .await
            .map_err(|e| format!("version {}: {e}", v.version))?;
        let version = v.version;
        let engine = tokio::task::spawn_blocking(move || {
            let artifact = Artifact::from_bytes(&bytes).map_err(|e| e.to_string())?;
            Engine::from_artifact(&artifact).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("version {version}: loading thread failed: {e}"))?
        .map_err(|e| format!("version {version} of `{model}`: {e}"))?;
        let engine = Arc::new(engine);
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.clone(), engine.clone());
        Ok(engine)
    }

    /// Loads what a registry entry routes to and then (only then) switches the route.
    async fn apply(&self, entry: ModelEntry, revision: u64) {
        let _guard = self.inner.apply_lock.lock().await;
        let model = entry.model.clone();
        if let Some(r) = self.table().routes.get(&model)
            && r.revision >= revision
        {
            return;
        }
        let serving = entry.serving();
        if serving.is_empty() {
            let mut t = self.table_mut();
            t.routes.remove(&model);
            t.wanted.remove(&model);
            t.failed.remove(&model);
            return;
        }
        self.table_mut().wanted.insert(model.clone(), revision);
        let mut targets = Vec::new();
        for (version, share) in serving {
            let Some(v) = entry.version(version) else {
                self.table_mut().failed.insert(
                    model.clone(),
                    format!("version {version} is not in the registry"),
                );
                return;
            };
            // Reuse what is loaded when the same version keeps serving.
            let loaded = self.table().routes.get(&model).and_then(|r| {
                r.targets
                    .iter()
                    .find(|(l, _)| l.version == version && l.digest == v.artifact.digest)
                    .map(|(l, _)| l.clone())
            });
            let loaded = match loaded {
                Some(l) => l,
                None => match self.engine_for(&model, v).await {
                    Ok(engine) => Arc::new(LoadedVersion {
                        version,
                        digest: v.artifact.digest.clone(),
                        job_id: v.job_id,
                        engine,
                        answered: AtomicU32::new(0),
                    }),
                    Err(why) => {
                        tracing::warn!(%model, version, %why, "Cannot load a model version");
                        self.table_mut().failed.insert(model.clone(), why);
                        return;
                    }
                },
            };
            targets.push((loaded, share));
        }
        let versions: Vec<u32> = targets.iter().map(|(v, _)| v.version).collect();
        {
            let mut t = self.table_mut();
            t.failed.remove(&model);
            t.routes
                .insert(model.clone(), Arc::new(Route { revision, targets }));
        }
        // Forget engines no route uses any more.
        let in_use: HashSet<String> = self
            .table()
            .routes
            .values()
            .flat_map(|r| r.targets.iter().map(|(v, _)| v.digest.clone()))
            .collect();
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|d, _| in_use.contains(d));
        tracing::info!(%model, ?versions, revision, "Serving");
    }

    /// Reads every registry entry once (readiness waits for this).
    async fn sync_all(&self) -> Result<(), RuntimeError> {
        for (entry, rev) in self.inner.registry.list_with_revisions().await? {
            self.apply(entry, rev).await;
        }
        self.inner.synced.store(true, Ordering::Release);
        Ok(())
    }

    async fn on_entry(&self, e: kv::Entry) {
        let Ok(model) = e.key.parse::<ModelName>() else {
            return;
        };
        match e.operation {
            kv::Operation::Put => match Registry::decode(model.as_str(), &e.value) {
                Ok(entry) => self.apply(entry, e.revision).await,
                Err(err) => {
                    tracing::warn!(%model, error = %err, "Ignoring an unreadable registry entry")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                let mut t = self.table_mut();
                t.routes.remove(&model);
                t.wanted.remove(&model);
                t.failed.remove(&model);
            }
        }
    }

    /// Follows the registry until `shutdown`: every change is applied as it is written
    /// (a rollback reaches every replica in milliseconds); failed loads are retried. Every
    /// 10 s the whole registry is read again as well, so that a replica converges to the
    /// registry even when its watch misses a change (one e2e run saw a replica keep the old
    /// version for 30 s after a cluster node was killed; the cause was not pinned down).
    /// `apply` skips what it already has, so a reread that finds nothing new changes nothing.
    async fn watch_registry(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let watch = self.inner.registry.kv().watch_with_history(">").await;
            if let Err(e) = self.sync_all().await {
                tracing::warn!(error = %e, "Cannot read the model registry");
            }
            match watch {
                Ok(mut w) => {
                    backoff = Duration::from_millis(200);
                    let mut retry = tokio::time::interval(Duration::from_secs(5));
                    let mut reread = tokio::time::interval(Duration::from_secs(10));
                    reread.tick().await;
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            next = w.next() => match next {
                                Some(Ok(e)) => self.on_entry(e).await,
                                Some(Err(e)) => {
                                    tracing::warn!(error = %e, "Registry watch failed");
                                    break;
                                }
                                None => break,
                            },
                            _ = reread.tick() => {
                                if let Err(e) = self.sync_all().await {
                                    tracing::warn!(error = %e, "Cannot read the model registry");
                                }
                            }
                            _ = retry.tick() => {
                                if !self.table().failed.is_empty() {
                                    let failed: Vec<ModelName> = self.table().failed.keys().cloned().collect();
                                    for model in failed {
                                        self.table_mut().routes.remove(&model);
                                        if let Ok(Some((entry, rev))) = self.inner.registry.get(&model).await {
                                            self.apply(entry, rev).await;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Cannot watch the model registry"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Answers one request for `model`: the code path of both NATS and HTTP.
    pub fn infer(
        &self,
        model: &str,
        payload: &[u8],
        content_type: Option<&str>,
        started: Instant,
        parent: Option<&HeaderMap>,
    ) -> Result<Served, InferError> {
        let name: ModelName = model
            .parse()
            .map_err(|e: String| InferError::not_found(format!("unknown model: {e}")))?;
        let route = {
            let t = self.table();
            match t.routes.get(&name) {
                Some(r) => r.clone(),
                None if t.wanted.contains_key(&name) || t.failed.contains_key(&name) => {
                    return Err(InferError::unavailable(format!(
                        "model `{name}` is registered but not loaded on this replica yet"
                    )));
                }
                None => {
                    return Err(InferError::not_found(format!(
                        "unknown model `{name}`: it has no active version in the registry"
                    )));
                }
            }
        };
        // A request may pin a version (the monitor's smoke test does), else the route's
        // weights decide.
        let pinned = parent
            .and_then(|h| h.get(names::VERSION_HEADER))
            .map(|v| {
                v.as_str().trim().parse::<u32>().map_err(|_| {
                    InferError::bad_request(format!(
                        "header {}: `{}` is not a version number",
                        names::VERSION_HEADER,
                        v.as_str()
                    ))
                })
            })
            .transpose()?;
        let target = match pinned {
            None => route.pick().clone(),
            Some(want) => route
                .targets
                .iter()
                .find(|(v, _)| v.version == want)
                .map(|(v, _)| v.clone())
                .ok_or_else(|| {
                    let serving: Vec<u32> = route.targets.iter().map(|(v, _)| v.version).collect();
                    InferError::unavailable(format!(
                        "version {want} of `{name}` is not serving on this replica (serving {serving:?})"
                    ))
                })?,
        };
        let engine = &target.engine;
        let result = request::parse(
            payload,
            content_type,
            engine.n_features(),
            Limits {
                max_batch_rows: self.inner.settings.max_batch_rows,
            },
        )
        .and_then(|parsed| {
            let span = self.request_span(&name, &target, parent);
            let _g = span.enter();
            let predictions = engine
                .predict_batch(&parsed.rows, parsed.n_rows)
                .map_err(|e| InferError::bad_request(format!("inputs: {e}")))?;
            let (bytes, ct) = request::encode_reply(
                &parsed,
                &name,
                target.version,
                engine.class_labels(),
                &predictions,
            );
            Ok((parsed, predictions, bytes, ct))
        });
        if let Some((v, delay)) = self.inner.settings.test_delay
            && v == target.version
        {
            std::thread::sleep(delay);
        }
        let latency_us = started.elapsed().as_micros() as u64;
        match result {
            Ok((parsed, predictions, bytes, ct)) => {
                let sample = (self.inner.settings.telemetry_sample >= 1.0
                    || rand::random::<f64>() < self.inner.settings.telemetry_sample)
                    .then(|| parsed.rows[..engine.n_features()].to_vec());
                self.record(TelemetryRecord {
                    schema_version: lathe_proto::SCHEMA_VERSION,
                    model: name,
                    version: target.version,
                    at_ms: now_ms(),
                    request_id: parsed.id.clone(),
                    latency_us,
                    rows: parsed.n_rows as u32,
                    predicted: predictions.iter().map(|p| p.class as u32).collect(),
                    error: None,
                    sampled_inputs: sample.into_iter().collect(),
                });
                Ok(Served {
                    bytes,
                    content_type: ct,
                })
            }
            Err(e) => {
                self.record(TelemetryRecord {
                    schema_version: lathe_proto::SCHEMA_VERSION,
                    model: name,
                    version: target.version,
                    at_ms: now_ms(),
                    request_id: None,
                    latency_us,
                    rows: 0,
                    predicted: Vec::new(),
                    error: Some(e.message.clone()),
                    sampled_inputs: Vec::new(),
                });
                Err(e)
            }
        }
    }

    /// The span of one request: a child of the caller's when it sent a `traceparent`; the
    /// first few requests of a new version also link to the deploying job's trace.
    fn request_span(
        &self,
        model: &ModelName,
        target: &LoadedVersion,
        parent: Option<&HeaderMap>,
    ) -> tracing::Span {
        let first = target.answered.fetch_add(1, Ordering::Relaxed) < LINKED_FIRST_REQUESTS;
        let has_parent = parent.is_some_and(|h| h.get(names::TRACEPARENT_HEADER).is_some());
        if !first && !has_parent {
            return tracing::Span::none();
        }
        let span = tracing::info_span!(
            "infer",
            otel.name = %format!("process {}", names::infer_subject(model)),
            otel.kind = "server",
            messaging.system = "nats",
            messaging.destination.name = %names::infer_subject(model),
            messaging.operation.type = "process",
            lathe.model = %model,
            lathe.version = target.version,
        );
        if has_parent {
            let _ = span.set_parent(trace::extract(parent));
        }
        if first {
            use opentelemetry::trace::TraceContextExt;
            let job_cx = trace::job_root_context(target.job_id);
            span.add_link(job_cx.span().span_context().clone());
        }
        span
    }

    /// Buffers a request's telemetry record. The buffer is taken by the flusher on its
    /// tick: the request path never wakes another task (a channel would, once per request).
    fn record(&self, r: TelemetryRecord) {
        let mut buf = self
            .inner
            .telemetry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if buf.len() < MAX_BUFFERED_TELEMETRY {
            buf.push(r);
        } else {
            self.inner.dropped_telemetry.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publishes the buffered telemetry in batches per model every flush period until
    /// `shutdown`, then once more.
    async fn telemetry_loop(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.settings.telemetry_flush);
        loop {
            let stop = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.cancelled() => true,
            };
            self.flush_telemetry().await;
            if stop {
                break;
            }
        }
    }

    async fn flush_telemetry(&self) {
        const MAX_BATCH: usize = 512;
        let records = std::mem::take(
            &mut *self
                .inner
                .telemetry
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let mut by_model: HashMap<ModelName, Vec<TelemetryRecord>> = HashMap::new();
        for r in records {
            by_model.entry(r.model.clone()).or_default().push(r);
        }
        for (model, mut records) in by_model {
            while !records.is_empty() {
                let rest = records.split_off(records.len().min(MAX_BATCH));
                self.publish_telemetry(model.clone(), records).await;
                records = rest;
            }
        }
    }

    /// Publishes records as one batch, or, when the batch is above the server's
    /// max_payload (wide inputs are sampled into records), as halves until each fits.
    async fn publish_telemetry(&self, model: ModelName, records: Vec<TelemetryRecord>) {
        let mut pending = vec![records];
        while let Some(records) = pending.pop() {
            let n = records.len();
            let batch = TelemetryBatch {
                schema_version: lathe_proto::SCHEMA_VERSION,
                replica: self.inner.settings.replica.clone(),
                model: model.clone(),
                records,
            };
            let mut headers = HeaderMap::new();
            headers.insert("Content-Type", "application/msgpack");
            let sent = self
                .inner
                .res
                .client
                .publish_with_headers(
                    names::telemetry_subject(&model),
                    headers,
                    codec::to_msgpack(&batch).into(),
                )
                .await;
            match sent {
                Ok(()) => {}
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded && n > 1 => {
                    let mut first = batch.records;
                    let second = first.split_off(n / 2);
                    pending.push(second);
                    pending.push(first);
                }
                Err(e) => {
                    if e.kind() == PublishErrorKind::MaxPayloadExceeded {
                        self.inner.dropped_telemetry.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(%model, error = %e, "Cannot publish telemetry");
                }
            }
        }
    }

    /// Serves until `shutdown`: registry watch, telemetry, and the NATS service endpoint.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let watcher = tokio::spawn(self.clone().watch_registry(shutdown.clone()));
        let telemetry_stop = CancellationToken::new();
        let telemetry = tokio::spawn(self.clone().telemetry_loop(telemetry_stop.clone()));
        let client = self.inner.res.client.clone();
        let service = client
            .service_builder()
            .description("lathe inference: lathe.infer.<model>")
            .queue_group(QUEUE_GROUP)
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| RuntimeError::nats("start the inference service", e))?;
        let mut endpoint = service
            .endpoint_builder()
            .name("infer")
            .add(names::INFER_SUBJECTS)
            .await
            .map_err(|e| RuntimeError::nats("add the inference endpoint", e))?;
        tracing::info!(subject = names::INFER_SUBJECTS, "Inference endpoint up");
        loop {
            let req = tokio::select! {
                r = endpoint.next() => r,
                _ = shutdown.cancelled() => None,
            };
            let Some(req) = req else { break };
            let started = Instant::now();
            let model = req
                .message
                .subject
                .strip_prefix(names::INFER_PREFIX)
                .and_then(|s| s.strip_prefix('.'))
                .unwrap_or("")
                .to_string();
            let headers = req.message.headers.as_ref();
            let ct = headers
                .and_then(|h| h.get("Content-Type"))
                .map(|v| v.as_str().to_string());
            let result = self.infer(
                &model,
                &req.message.payload,
                ct.as_deref(),
                started,
                headers,
            );
            let sent = match result {
                // The reply is in the request's encoding and names its version in the body;
                // headers are left out of the hot path (a JSON reply needs none).
                Ok(served) if served.content_type == "application/json" => {
                    req.respond(Ok(served.bytes.into())).await
                }
                Ok(served) => {
                    let mut h = HeaderMap::new();
                    h.insert("Content-Type", served.content_type);
                    req.respond_with_headers(Ok(served.bytes.into()), h).await
                }
                Err(e) => {
                    req.respond(Err(async_nats::service::error::Error {
                        status: e.message,
                        code: e.code as usize,
                    }))
                    .await
                }
            };
            let sent = match sent {
                // A reply above the server's max_payload cannot be sent at all: the client
                // gets a 413 naming both sizes instead of waiting for its timeout.
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    req.respond(Err(async_nats::service::error::Error {
                        status: format!(
                            "the reply is too large for this NATS server ({e}): send fewer rows per request"
                        ),
                        code: 413,
                    }))
                    .await
                }
                other => other,
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, "Cannot send an inference reply");
            }
        }
        let _ = service.stop().await;
        telemetry_stop.cancel();
        let _ = telemetry.await;
        let _ = watcher.await;
        let dropped = self.inner.dropped_telemetry.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "Telemetry records dropped (the publisher fell behind)"
            );
        }
        Ok(())
    }
}
