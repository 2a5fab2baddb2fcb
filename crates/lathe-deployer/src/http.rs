//! The optional HTTP front (`--http ADDR`, off by default): the Open Inference Protocol's
//! endpoints over the same serving state the NATS endpoint uses, plus `/livez` and
//! `/readyz`. `/v2/health/ready` (and `/readyz`) answer 200 only when the replica is
//! connected to NATS and every active version is loaded, so Kubernetes never routes to a
//! replica that is "Ready" without its model.

use std::net::SocketAddr;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use lathe_proto::ModelName;
use lathe_proto::oip::{OipModelMetadata, OipTensorMetadata};
use lathe_runtime::RuntimeError;
use lathe_runtime::health::{self, Readiness};
use tokio_util::sync::CancellationToken;

use crate::serving::Serving;

#[derive(Clone)]
struct AppState {
    serving: Serving,
    readiness: Readiness,
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn live() -> Response {
    json(StatusCode::OK, serde_json::json!({"live": true}))
}

async fn ready(State(s): State<AppState>) -> Response {
    match s.readiness.check() {
        Ok(()) => json(StatusCode::OK, serde_json::json!({"ready": true})),
        Err(why) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"ready": false, "error": why}),
        ),
    }
}

async fn model_ready(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let Ok(model) = name.parse::<ModelName>() else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("unknown model `{name}`")}),
        );
    };
    if s.serving.serving_versions(&model).is_empty() {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"name": name, "ready": false}),
        );
    }
    json(
        StatusCode::OK,
        serde_json::json!({"name": name, "ready": true}),
    )
}

async fn metadata(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    let engine = name
        .parse::<ModelName>()
        .ok()
        .and_then(|m| s.serving.engine_of(&m).map(|e| (m, e)));
    let Some((model, engine)) = engine else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": format!("unknown model `{name}`: it has no active version on this replica")}),
        );
    };
    let meta = OipModelMetadata {
        name: model.to_string(),
        versions: s
            .serving
            .serving_versions(&model)
            .iter()
            .map(|v| v.to_string())
            .collect(),
        platform: "lathe".into(),
        inputs: vec![OipTensorMetadata {
            name: "input-0".into(),
            datatype: "FP32".into(),
            shape: vec![-1, engine.n_features() as i64],
        }],
        outputs: vec![
            OipTensorMetadata {
                name: "predicted_class".into(),
                datatype: "INT64".into(),
                shape: vec![-1],
            },
            OipTensorMetadata {
                name: "probabilities".into(),
                datatype: "FP32".into(),
                shape: vec![-1, engine.n_classes() as i64],
            },
        ],
    };
    json(
        StatusCode::OK,
        serde_json::to_value(meta).unwrap_or_default(),
    )
}

async fn infer(
    State(s): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut nats_headers = async_nats::HeaderMap::new();
    for name in [
        lathe_proto::names::TRACEPARENT_HEADER,
        lathe_proto::names::VERSION_HEADER,
    ] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            nats_headers.insert(name, v);
        }
    }
    match s
        .serving
        .infer(&name, &body, ct.as_deref(), started, Some(&nats_headers))
    {
        Ok(served) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, served.content_type)],
            served.bytes,
        )
            .into_response(),
        Err(e) => json(
            StatusCode::from_u16(e.code).unwrap_or(StatusCode::BAD_REQUEST),
            serde_json::json!({"error": e.message}),
        ),
    }
}

/// The HTTP front's routes.
pub fn router(serving: Serving, readiness: Readiness) -> Router {
    let oip = Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .with_state(AppState {
            serving,
            readiness: readiness.clone(),
        });
    oip.merge(health::router(readiness))
}

/// Binds `addr` and serves the HTTP front in the background until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    serving: Serving,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let listener = health::bind(addr, "LATHE_HTTP_ADDR").await?;
    health::serve_router(listener, router(serving, readiness), shutdown);
    tracing::info!(%addr, "HTTP front (Open Inference Protocol) listening");
    Ok(())
}
