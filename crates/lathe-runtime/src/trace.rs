//! Telemetry: readable (or JSON) logs, and OpenTelemetry traces exported by OTLP when the
//! standard `OTEL_EXPORTER_OTLP_*` variables say where; W3C trace context carried in NATS
//! headers so that one job is one trace across every service.
//!
//! A job's id is its trace id. The SDK draws trace ids from its id generator and ignores a
//! builder's trace id, so intake's root span takes the job id through [`JobIdGenerator`],
//! which hands out a forced id when one is set on the current thread.

use std::cell::Cell;

use async_nats::HeaderMap;
use lathe_proto::{JobId, names};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

thread_local! {
    static FORCED_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
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
        self.random.new_span_id()
    }
}

/// Runs `f` (which must start exactly one root span, synchronously) with its trace id forced.
fn with_trace_id<R>(id: TraceId, f: impl FnOnce() -> R) -> R {
    FORCED_TRACE_ID.with(|c| c.set(Some(id)));
    let r = f();
    FORCED_TRACE_ID.with(|c| c.set(None));
    r
}

/// The trace id of a job.
pub fn job_trace_id(job: JobId) -> TraceId {
    TraceId::from_bytes(job.trace_id_bytes())
}

/// Keeps the tracer provider alive; `shutdown` flushes the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the exporter. Call it on exit, outside a current-thread runtime.
    pub fn shutdown(mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("telemetry: spans not flushed on shutdown: {e}");
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

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"));
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
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_target(false))
            .try_init()
    };
    if installed.is_ok() {
        global::set_tracer_provider(provider.clone());
        Telemetry {
            provider: Some(provider),
        }
    } else {
        // Another service in this process set up telemetry first; its provider serves all.
        let _ = provider.shutdown();
        Telemetry { provider: None }
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

/// Starts a job's root span (its trace id is the job id) and returns its context. Without a
/// tracer provider the context still carries the job's trace id, so headers and logs agree.
pub fn start_job_root(
    job: JobId,
    name: &str,
    service: &str,
) -> (Context, opentelemetry::global::BoxedSpan) {
    let tracer = global::tracer(service.to_string());
    let span = with_trace_id(job_trace_id(job), || {
        tracer
            .span_builder(format!("job {name}"))
            .with_kind(SpanKind::Internal)
            .with_attributes(vec![
                KeyValue::new("lathe.job.id", job.to_string()),
                KeyValue::new("lathe.job.name", name.to_string()),
            ])
            .start(&tracer)
    });
    let sc = span.span_context().clone();
    let cx = if sc.is_valid() && sc.trace_id() == job_trace_id(job) {
        Context::new().with_remote_span_context(sc)
    } else {
        let id = SpanId::from_bytes(rand::random::<[u8; 8]>());
        Context::new().with_remote_span_context(SpanContext::new(
            job_trace_id(job),
            id,
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    };
    (cx, span)
}
