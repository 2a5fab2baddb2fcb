//! An OTLP/gRPC trace and metrics receiver for tests, built on `opentelemetry-proto`'s
//! generated servers: services export to it exactly as they would to a collector or Jaeger,
//! and the test reads back every span and metric point with its service name.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;

/// One data point of a gauge or sum as the receiver got it.
#[derive(Clone, Debug)]
pub struct ReceivedPoint {
    pub service: String,
    pub metric: String,
    pub attributes: BTreeMap<String, String>,
    pub value: f64,
}

/// A span as the receiver got it.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub service: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    pub name: String,
    /// OTLP span kind: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    /// The `(trace id, span id)` of every linked span.
    pub links: Vec<(Vec<u8>, Vec<u8>)>,
}

impl ReceivedSpan {
    /// A numeric attribute.
    pub fn number(&self, key: &str) -> Option<f64> {
        self.attributes.get(key).and_then(|v| v.parse().ok())
    }
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    points: Arc<Mutex<Vec<ReceivedPoint>>>,
}

fn text(v: Option<&Value>) -> String {
    match v {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

type KeyValues = [opentelemetry_proto::tonic::common::v1::KeyValue];

/// Attributes as `key → text`.
fn attributes(kvs: &KeyValues) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|a| {
            (
                a.key.clone(),
                text(a.value.as_ref().and_then(|v| v.value.as_ref())),
            )
        })
        .collect()
}

/// The `service.name` of an exporting resource.
fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .map(|r| attributes(&r.attributes))
        .and_then(|mut a| a.remove("service.name"))
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.spans.lock().expect("collector lock");
        for rs in request.into_inner().resource_spans {
            let service = service_name(rs.resource.as_ref());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(ReceivedSpan {
                        service: service.clone(),
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                        name: s.name,
                        kind: s.kind,
                        attributes: attributes(&s.attributes),
                        start_unix_nano: s.start_time_unix_nano,
                        end_unix_nano: s.end_time_unix_nano,
                        status_code: s.status.map(|st| st.code).unwrap_or(0),
                        links: s
                            .links
                            .into_iter()
                            .map(|l| (l.trace_id, l.span_id))
                            .collect(),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut out = self.points.lock().expect("collector lock");
        for rm in request.into_inner().resource_metrics {
            let service = service_name(rm.resource.as_ref());
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    let points = match m.data {
                        Some(Data::Gauge(g)) => g.data_points,
                        Some(Data::Sum(s)) => s.data_points,
                        _ => continue,
                    };
                    for p in points {
                        let value = match p.value {
                            Some(number_data_point::Value::AsDouble(d)) => d,
                            Some(number_data_point::Value::AsInt(i)) => i as f64,
                            None => continue,
                        };
                        out.push(ReceivedPoint {
                            service: service.clone(),
                            metric: m.name.clone(),
                            attributes: attributes(&p.attributes),
                            value,
                        });
                    }
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

/// A running receiver; stops when dropped.
pub struct OtlpReceiver {
    endpoint: String,
    collector: Collector,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl OtlpReceiver {
    /// Starts the receiver on a free local port (inside a tokio runtime).
    pub async fn start() -> OtlpReceiver {
        let port = crate::free_port();
        let collector = Collector::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = TraceServiceServer::new(collector.clone());
        let metrics = MetricsServiceServer::new(collector.clone());
        let addr = ([127, 0, 0, 1], port).into();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .add_service(metrics)
                .serve_with_shutdown(addr, async {
                    let _ = stopped.await;
                })
                .await;
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the OTLP receiver did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        OtlpReceiver {
            endpoint: format!("http://127.0.0.1:{port}"),
            collector,
            stop: Some(stop),
        }
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT` (gRPC).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.collector.spans.lock().expect("collector lock").clone()
    }

    /// Every metric data point received so far.
    pub fn points(&self) -> Vec<ReceivedPoint> {
        self.collector
            .points
            .lock()
            .expect("collector lock")
            .clone()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
