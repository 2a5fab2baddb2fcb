//! `lathe-monitor`: the monitor stage and continuous monitoring as one service, configured
//! from the environment like every service (plus `LATHE_MONITOR_TICK_MS`,
//! `LATHE_SMOKE_TIMEOUT_SECS`).

use std::process::ExitCode;

fn main() -> ExitCode {
    lathe_runtime::service::main_with("lathe-monitor", |res, _readiness, stop| async move {
        let settings = lathe_monitor::MonitorSettings::from_env()?;
        tracing::info!(?settings, "Monitor settings");
        lathe_monitor::run(res, settings, stop).await
    })
}
