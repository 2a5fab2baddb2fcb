//! `lathe-monitor`: the monitor stage and continuous monitoring as one service, configured
//! from the environment like every service (plus `LATHE_MONITOR_TICK_MS`,
//! `LATHE_SMOKE_TIMEOUT_SECS`).

use std::process::ExitCode;

use lathe_runtime::{NatsSettings, WorkerSettings, health, service, shutdown, trace};

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lathe-monitor: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = runtime.block_on(async { trace::init_telemetry("lathe-monitor") });
    let result = runtime.block_on(async {
        let nats = NatsSettings::from_env()?;
        let worker = WorkerSettings::from_env()?;
        let settings = lathe_monitor::MonitorSettings::from_env()?;
        tracing::info!(url = %nats.url, ?worker, ?settings, "Starting lathe-monitor");
        let stop = shutdown::on_signal();
        let readiness = health::Readiness::default();
        if let Some(addr) = health::addr_from_env()? {
            health::serve(addr, readiness.clone(), stop.clone()).await?;
        }
        let res = service::start("lathe-monitor", &nats, worker).await?;
        let client = res.client.clone();
        readiness.provisioned(client.clone());
        lathe_monitor::run(res, settings, stop).await?;
        if let Err(e) = client.drain().await {
            tracing::warn!(error = %e, "NATS drain failed");
        }
        tracing::info!("Stopped");
        Ok::<(), lathe_runtime::RuntimeError>(())
    });
    telemetry.shutdown();
    drop(runtime);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lathe-monitor: {e}");
            ExitCode::FAILURE
        }
    }
}
