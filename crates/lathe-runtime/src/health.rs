//! The health endpoint every service exposes for its orchestrator (Kubernetes probes), when
//! `LATHE_HEALTH_ADDR` is set: `GET /livez` answers 200 while the process runs; `GET /readyz`
//! answers 200 only once the service has connected and provisioned its NATS resources and
//! while the connection holds, else 503 with the reason.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::error::RuntimeError;

/// A service's own readiness condition (the deployer's: every active model loaded).
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What readiness looks at; shared between the service and its health endpoint.
#[derive(Clone, Default)]
pub struct Readiness {
    /// Set once the service has connected and provisioned.
    client: Arc<OnceLock<async_nats::Client>>,
    /// Further conditions a service adds.
    checks: Arc<Mutex<Vec<ReadyCheck>>>,
}

impl Readiness {
    /// Marks the service provisioned; from now on readiness follows the connection.
    pub fn provisioned(&self, client: async_nats::Client) {
        let _ = self.client.set(client);
    }

    /// Adds a condition that must hold too.
    pub fn add_check(&self, check: ReadyCheck) {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(check);
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), String> {
        match self.client.get() {
            None => return Err("not ready: NATS resources not provisioned yet".into()),
            Some(c) if c.connection_state() != async_nats::connection::State::Connected => {
                return Err("not ready: disconnected from NATS".into());
            }
            Some(_) => {}
        }
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for check in checks {
            check().map_err(|why| format!("not ready: {why}"))?;
        }
        Ok(())
    }
}

async fn livez() -> &'static str {
    "live\n"
}

async fn readyz(State(r): State<Readiness>) -> (StatusCode, String) {
    match r.check() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// The `/livez` and `/readyz` routes, for a service that serves more on the same port.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(readiness)
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
    let listener = bind(addr, "LATHE_HEALTH_ADDR").await?;
    serve_router(listener, router(readiness), shutdown);
    tracing::info!(%addr, "Health endpoint listening");
    Ok(())
}

/// Binds `addr` for a service's HTTP routes; the error names `setting`.
pub async fn bind(
    addr: SocketAddr,
    setting: &'static str,
) -> Result<tokio::net::TcpListener, RuntimeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| RuntimeError::Setting {
            name: setting,
            reason: format!("cannot listen on {addr}: {e}"),
        })
}

/// Serves `app` on `listener` in the background until `shutdown`.
pub fn serve_router(listener: tokio::net::TcpListener, app: Router, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "HTTP endpoint stopped");
        }
    });
}
