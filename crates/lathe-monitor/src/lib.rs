//! `lathe-monitor`: the last link of the chain and the one that keeps running.
//!
//! - [`step`]: the `monitor` job step — smoke test through the live endpoint, baseline,
//!   policy attached to the model, job summary.
//! - [`watch`]: continuous monitoring of every deployed model from telemetry and feedback —
//!   rolling windows, health in `lathe-health`, alerts, canary promotion, rollback,
//!   retraining on persistent drift.
//! - [`window`]: one version's window and its judgement against a policy (pure).
//! - [`stats`]: quantiles, PSI, the KS p-value (pure).
//! - [`metrics`]: the figures as OpenTelemetry gauges.

pub mod metrics;
pub mod stats;
pub mod step;
pub mod watch;
pub mod window;

use lathe_runtime::{Resources, RuntimeError, service};
use tokio_util::sync::CancellationToken;

pub use step::MonitorStep;
pub use watch::{MonitorSettings, Watcher};

/// Runs a monitor replica on provisioned resources until `shutdown`: the watcher, and
/// intake plus the monitor stage's worker.
pub async fn run(
    res: Resources,
    settings: MonitorSettings,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let watcher = Watcher::new(res.clone(), settings.clone());
    let watching = tokio::spawn(watcher.run(shutdown.clone()));
    let worked = service::serve(
        res,
        "lathe-monitor",
        MonitorStep { settings },
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    match watching.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "Monitoring stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "Monitoring task failed"),
        Ok(Ok(())) => {}
    }
    worked
}
