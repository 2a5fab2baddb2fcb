//! `lathe-deployer`: the deploy stage and the serving side.
//!
//! - [`deploy`]: the `deploy` job step — verify, evaluate, gate, register (CAS), promote.
//! - [`serving`]: every replica watches the registry, hot-loads the active and canary
//!   versions and answers `lathe.infer.<model>` as a NATS service (queue group), with
//!   canary traffic split by weight and telemetry for the monitor.
//! - [`request`]: the request shapes (lathe's own, JSON or MessagePack; the Open Inference
//!   Protocol's) and their errors.
//! - [`http`]: the optional Open Inference Protocol HTTP front.
//! - [`run`]: the whole process, shared by the binary and `lathe up`.

pub mod deploy;
pub mod http;
pub mod request;
pub mod serving;

use std::net::SocketAddr;

use lathe_runtime::health::Readiness;
use lathe_runtime::{Resources, RuntimeError, service};
use tokio_util::sync::CancellationToken;

pub use deploy::Deployer;
pub use serving::{ServeSettings, Serving};

/// Runs a deployer replica on provisioned resources until `shutdown`: the serving side
/// (registry watch, inference endpoint, telemetry), the optional HTTP front, and intake
/// plus the deploy stage's worker. `readiness` gains the "every active version loaded"
/// condition.
pub async fn run(
    res: Resources,
    settings: ServeSettings,
    http: Option<SocketAddr>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let serving = Serving::new(res.clone(), settings);
    let check = serving.clone();
    readiness.add_check(std::sync::Arc::new(move || check.ready()));
    if let Some(addr) = http {
        http::serve(addr, serving.clone(), readiness.clone(), shutdown.clone()).await?;
    }
    let served = tokio::spawn(serving.clone().run(shutdown.clone()));
    let worked = service::serve(
        res,
        "lathe-deployer",
        Deployer::new(Some(serving)),
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    match served.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "Serving stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "Serving task failed"),
        Ok(Ok(())) => {}
    }
    worked
}
