//! Telemetry: readable (or JSON) logs, and OpenTelemetry traces exported by OTLP when the
//! standard `OTEL_EXPORTER_OTLP_*` variables say where; W3C trace context carried in NATS
//! headers so that one job is one trace across every service.
//!
//! A job's id is its trace id. The SDK draws ids from its id generator and ignores a
//! builder's trace id, so the job's root span takes the job id (and a span id derived from
//! it) through [`JobIdGenerator`], which hands out forced ids when they are set on the
//! current thread. The root span is emitted when the job ends, spanning the whole job; every
//! span before that parents to its (derived) id.

use std::cell::Cell;

use async_nats::HeaderMap;
use lathe_proto::{JobId, names};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

thread_local! {
    static FORCED_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
    static FORCED_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
}

/// Random ids, except a trace id forced for the current thread by [`with_trace_id`].
#[derive(Debug, Default)]
pub struct JobIdGenerator {
    random: RandomIdGenerator,
}

impl IdGenerator for JobIdGenerator {
    fn new_trace_id(&self) -> TraceId {
        FORCED_TRACE_ID
            .with(|c| c.take())
            .unwrap_or_else(|| self.random.new_trace_id())
    }
    fn new_span_id(&self) -> SpanId {
        FORCED_SPAN_ID
            .with(|c| c.take())
            .unwrap_or_else(|| self.random.new_span_id())
    }
}

/// Runs `f` (which must start exactly one span, synchronously, without a parent) with its
/// trace id and span id forced.
fn with_ids<R>(trace_id: TraceId, span_id: SpanId, f: impl FnOnce() -> R) -> R {
    FORCED_TRACE_ID.with(|c| c.set(Some(trace_id)));
    FORCED_SPAN_ID.with(|c| c.set(Some(span_id)));
    let r = f();
    FORCED_TRACE_ID.with(|c| c.set(None));
    FORCED_SPAN_ID.with(|c| c.set(None));
    r
}

/// Writes a span's OpenTelemetry span id into its `span_id` field, so that every log line
/// inside it (JSON logs list the spans in scope) names the span a trace view shows.
pub fn record_span_id(span: &tracing::Span) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let id = span.context().span().span_context().span_id();
    span.record("span_id", tracing::field::display(id));
}

/// The trace id of a job.
pub fn job_trace_id(job: JobId) -> TraceId {
    TraceId::from_bytes(job.trace_id_bytes())
}

/// Keeps the tracer (and meter) provider alive; `shutdown` flushes what is still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter. Call it on exit, outside a current-thread runtime.
    pub fn shutdown(mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("telemetry: spans not flushed on shutdown: {e}");
        }
        if let Some(m) = self.meters.take()
            && let Err(e) = m.shutdown()
        {
            eprintln!("telemetry: metrics not flushed on shutdown: {e}");
        }
    }
}

fn otlp_endpoint_set() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| {
        std::env::var(v)
            .map(|s| !s.trim().is_empty())
            .unwrap_or(false)
    })
}

/// Sets up logging and tracing for a service. `OTEL_SERVICE_NAME` overrides `service`;
/// `LATHE_LOG_FORMAT=json` switches logs to JSON; `RUST_LOG` filters them. Without an OTLP
/// endpoint spans are still created (so trace ids reach logs and headers) but not exported.
/// Safe to call more than once in one process (the first call wins), as `lathe up` does.
pub fn init_telemetry(service: &str) -> Telemetry {
    init_telemetry_with(service, "info")
}

/// [`init_telemetry`] with another default log level (`RUST_LOG` still wins); the demo keeps
/// the terminal for its progress bars with `"warn"`.
pub fn init_telemetry_with(service: &str, default_level: &str) -> Telemetry {
    let service_name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
    let mut builder = SdkTracerProvider::builder()
        .with_id_generator(JobIdGenerator::default())
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.clone())
                .build(),
        );
    if otlp_endpoint_set() {
        let protocol =
            std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|_| "grpc".into());
        let exporter = if protocol.starts_with("http") {
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()
        } else {
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
        };
        match exporter {
            Ok(e) => builder = builder.with_batch_exporter(e),
            Err(e) => {
                eprintln!("telemetry: OTLP exporter not started ({e}); spans will not be exported")
            }
        }
    }
    let provider = builder.build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    let meters = metrics_provider(&service_name);

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{default_level},async_nats=warn,opentelemetry=warn,opentelemetry_sdk=warn"
        ))
    });
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service_name));
    let json = std::env::var("LATHE_LOG_FORMAT")
        .map(|v| v == "json")
        .unwrap_or(false);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let installed = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_span_list(true),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_target(false))
            .try_init()
    };
    if installed.is_ok() {
        global::set_tracer_provider(provider.clone());
        if let Some(m) = &meters {
            global::set_meter_provider(m.clone());
        }
        Telemetry {
            provider: Some(provider),
            meters,
        }
    } else {
        // Another service in this process set up telemetry first; its provider serves all.
        let _ = provider.shutdown();
        if let Some(m) = meters {
            let _ = m.shutdown();
        }
        Telemetry {
            provider: None,
            meters: None,
        }
    }
}

/// A meter provider exporting by OTLP (every `OTEL_METRIC_EXPORT_INTERVAL`, default 60 s) when
/// an endpoint is set, so that the monitor's figures land beside the traces; none without.
fn metrics_provider(service_name: &str) -> Option<SdkMeterProvider> {
    let set = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    ]
    .iter()
    .any(|v| {
        std::env::var(v)
            .map(|s| !s.trim().is_empty())
            .unwrap_or(false)
    });
    if !set {
        return None;
    }
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|_| "grpc".into());
    let exporter = if protocol.starts_with("http") {
        opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .build()
    } else {
        opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()
    };
    match exporter {
        Ok(e) => Some(
            SdkMeterProvider::builder()
                .with_periodic_exporter(e)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service_name.to_string())
                        .build(),
                )
                .build(),
        ),
        Err(e) => {
            eprintln!(
                "telemetry: OTLP metric exporter not started ({e}); metrics will not be exported"
            );
            None
        }
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);
impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Header names from the W3C propagator are lowercase ASCII and always valid.
        self.0
            .insert(key.to_ascii_lowercase().as_str(), value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);
impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        vec![names::TRACEPARENT_HEADER, "tracestate"]
    }
}

/// Writes the context's span into `traceparent` (and `tracestate`).
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// Reads the caller's span from the headers; an empty context when there is none.
pub fn extract(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(h) => TraceContextPropagator::new().extract(&HeaderExtractor(h)),
        None => Context::new(),
    }
}

/// The span id of a job's root span, derived from the job id so that every service can
/// parent to it and the one that ends the job can emit it, without storing it anywhere.
pub fn root_span_id(job: JobId) -> SpanId {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("lathe-root:{job}"));
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    if bytes == [0; 8] {
        bytes[7] = 1;
    }
    SpanId::from_bytes(bytes)
}

/// The context of a job's root span (trace id = job id), to parent the job's first spans.
pub fn job_root_context(job: JobId) -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        job_trace_id(job),
        root_span_id(job),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

/// Emits a job's root span, from its acceptance to now, when the job ends. The span's ids
/// are forced to the job's trace id and derived root span id, so the spans every stage
/// parented to it during the job hang under it.
pub fn end_job_root(job: JobId, name: &str, started_unix_ms: u64, failure: Option<&str>) {
    let tracer = global::tracer("lathe");
    let start = std::time::UNIX_EPOCH + std::time::Duration::from_millis(started_unix_ms);
    let mut span = with_ids(job_trace_id(job), root_span_id(job), || {
        tracer
            .span_builder(format!("job {name}"))
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(vec![
                KeyValue::new("lathe.job.id", job.to_string()),
                KeyValue::new("lathe.job.name", name.to_string()),
            ])
            .start_with_context(&tracer, &Context::new())
    });
    if let Some(reason) = failure {
        span.set_status(opentelemetry::trace::Status::error(reason.to_string()));
        span.set_attribute(KeyValue::new("error.type", "job_failed"));
    }
    span.end();
}
