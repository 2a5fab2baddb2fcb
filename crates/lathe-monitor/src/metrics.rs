//! The monitor's figures as OpenTelemetry gauges (exported by OTLP with the traces when an
//! endpoint is set; without one the global meter is a no-op): per model, version and role.

use std::sync::OnceLock;

use lathe_proto::health::ModelHealth;
use opentelemetry::metrics::Gauge;
use opentelemetry::{KeyValue, global};

struct Gauges {
    rps: Gauge<f64>,
    p50: Gauge<f64>,
    p99: Gauge<f64>,
    error_rate: Gauge<f64>,
    accuracy: Gauge<f64>,
    max_psi: Gauge<f64>,
}

fn gauges() -> &'static Gauges {
    static G: OnceLock<Gauges> = OnceLock::new();
    G.get_or_init(|| {
        let m = global::meter("lathe-monitor");
        Gauges {
            rps: m
                .f64_gauge("lathe.model.requests_per_second")
                .with_unit("{request}/s")
                .build(),
            p50: m
                .f64_gauge("lathe.model.latency.p50")
                .with_unit("ms")
                .build(),
            p99: m
                .f64_gauge("lathe.model.latency.p99")
                .with_unit("ms")
                .build(),
            error_rate: m.f64_gauge("lathe.model.error_rate").with_unit("1").build(),
            accuracy: m.f64_gauge("lathe.model.accuracy").with_unit("1").build(),
            max_psi: m
                .f64_gauge("lathe.model.feature_psi.max")
                .with_unit("1")
                .build(),
        }
    })
}

/// Records one evaluation of a model.
pub fn record(h: &ModelHealth) {
    let g = gauges();
    for v in &h.versions {
        let attrs = [
            KeyValue::new("lathe.model", h.model.to_string()),
            KeyValue::new("lathe.version", i64::from(v.version)),
            KeyValue::new("lathe.role", v.role.clone()),
        ];
        g.rps.record(v.requests_per_sec, &attrs);
        g.p50.record(v.p50_ms, &attrs);
        g.p99.record(v.p99_ms, &attrs);
        g.error_rate.record(v.error_rate, &attrs);
        if let Some(a) = v.accuracy {
            g.accuracy.record(a, &attrs);
        }
        if let Some(p) = v.max_feature_psi {
            g.max_psi.record(p, &attrs);
        }
    }
}
