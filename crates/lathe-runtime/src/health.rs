//! The health endpoint every service exposes for its orchestrator (Kubernetes probes), when
//! `LATHE_HEALTH_ADDR` is set: `GET /livez` answers 200 while the process runs; `GET /readyz`
//! answers 200 only once the service has connected and provisioned its NATS resources and
//! while the connection holds, else 503 with the reason.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::error::RuntimeError;

/// What readiness looks at; shared between the service and its health endpoint.
#[derive(Clone, Default)]
pub struct Readiness {
    /// Set once the service has connected and provisioned.
    client: Arc<OnceLock<async_nats::Client>>,
}

impl Readiness {
    /// Marks the service provisioned; from now on readiness follows the connection.
    pub fn provisioned(&self, client: async_nats::Client) {
        let _ = self.client.set(client);
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), &'static str> {
        match self.client.get() {
            None => Err("not ready: NATS resources not provisioned yet"),
            Some(c) if c.connection_state() != async_nats::connection::State::Connected => {
                Err("not ready: disconnected from NATS")
            }
            Some(_) => Ok(()),
        }
    }
}

async fn livez() -> &'static str {
    "live\n"
}

async fn readyz(State(r): State<Readiness>) -> (StatusCode, &'static str) {
    match r.check() {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// The address from `LATHE_HEALTH_ADDR`, if set.
pub fn addr_from_env() -> Result<Option<SocketAddr>, RuntimeError> {
    match std::env::var("LATHE_HEALTH_ADDR") {
        Ok(v) if !v.trim().is_empty() => {
            v.trim()
                .parse()
                .map(Some)
                .map_err(|e| RuntimeError::Setting {
                    name: "LATHE_HEALTH_ADDR",
                    reason: format!("`{v}` is not host:port: {e}"),
                })
        }
        _ => Ok(None),
    }
}

/// Binds the health endpoint and serves it in the background until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let listener =
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| RuntimeError::Setting {
                name: "LATHE_HEALTH_ADDR",
                reason: format!("cannot listen on {addr}: {e}"),
            })?;
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(readiness);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "Health endpoint stopped");
        }
    });
    tracing::info!(%addr, "Health endpoint listening");
    Ok(())
}
