//! The composition every service's `main` shares: settings from the environment, telemetry,
//! connect, provision, run intake and the stage worker until SIGTERM, drain, flush spans.

use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::RuntimeError;
use crate::provision::{Resources, provision};
use crate::settings::{NatsSettings, WorkerSettings, connect};
use crate::worker::{StageHandler, run_worker};
use crate::{health, intake, shutdown, trace};

/// Connects and provisions, as every service does at start.
pub async fn start(
    service: &str,
    nats: &NatsSettings,
    worker: WorkerSettings,
) -> Result<Resources, RuntimeError> {
    let client = connect(nats, service, Duration::from_secs(10)).await?;
    provision(client, worker).await
}

/// Runs intake (unless `LATHE_INTAKE` turned it off) and a stage's worker on provisioned
/// resources until `shutdown` is cancelled; in-flight tasks are finished before it returns.
pub async fn serve<H: StageHandler>(
    res: Resources,
    service: &'static str,
    handler: H,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let intake = res
        .worker
        .intake
        .then(|| tokio::spawn(intake::run_intake(res.clone(), service, shutdown.clone())));
    if intake.is_none() {
        tracing::info!("Intake off (LATHE_INTAKE): another service accepts submitted jobs");
    }
    let worked = run_worker(res, handler, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(intake) = intake {
        match intake.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "Intake stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "Intake task failed"),
            Ok(Ok(())) => {}
        }
    }
    worked
}

/// A whole service process: `fn main() -> ExitCode { service::main("lathe-trainer", Trainer) }`.
pub fn main<H: StageHandler>(service: &'static str, handler: H) -> ExitCode {
    main_with(service, move |res, _readiness, stop| {
        serve(res, service, handler, stop)
    })
}

/// A service process that runs more than a stage worker (the deployer serves inference, the
/// monitor watches models): settings, telemetry, health endpoint, connect and provision as
/// [`main`] does, then `run(resources, readiness, shutdown)` until SIGTERM, drain, flush.
pub fn main_with<F, Fut>(service: &'static str, run: F) -> ExitCode
where
    F: FnOnce(Resources, health::Readiness, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), RuntimeError>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{service}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = runtime.block_on(async { trace::init_telemetry(service) });
    let result: Result<(), RuntimeError> = runtime.block_on(async {
        let nats = NatsSettings::from_env()?;
        let worker = WorkerSettings::from_env()?;
        tracing::info!(url = %nats.url, ?worker, "Starting {service}");
        let stop = shutdown::on_signal();
        // The health endpoint comes up first, answering "not ready" until provisioning is done.
        let readiness = health::Readiness::default();
        if let Some(addr) = health::addr_from_env()? {
            health::serve(addr, readiness.clone(), stop.clone()).await?;
        }
        let res = start(service, &nats, worker).await?;
        let client = res.client.clone();
        readiness.provisioned(client.clone());
        run(res, readiness, stop).await?;
        if let Err(e) = client.drain().await {
            tracing::warn!(error = %e, "NATS drain failed");
        }
        tracing::info!("Stopped");
        Ok(())
    });
    // Flush spans while the runtime that drives the gRPC exporter still runs (this thread is
    // outside it, so the blocking shutdown does not stall it).
    telemetry.shutdown();
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{service}: {e}");
            ExitCode::FAILURE
        }
    }
}
