//! `lathe-deployer`: the deploy stage and inference serving as one service. Settings come
//! from the environment (as every service's) plus `--http ADDR` / `LATHE_HTTP_ADDR` for the
//! optional Open Inference Protocol HTTP front.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use lathe_runtime::{NatsSettings, WorkerSettings, health, service, shutdown, trace};

#[derive(Parser)]
#[command(
    name = "lathe-deployer",
    version,
    about = "lathe's deploy stage and inference service"
)]
struct Args {
    /// Serve the Open Inference Protocol over HTTP on this address (also /livez, /readyz).
    #[arg(long, env = "LATHE_HTTP_ADDR")]
    http: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lathe-deployer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = runtime.block_on(async { trace::init_telemetry("lathe-deployer") });
    let result = runtime.block_on(async {
        let nats = NatsSettings::from_env()?;
        let worker = WorkerSettings::from_env()?;
        let settings = lathe_deployer::ServeSettings::from_env()?;
        tracing::info!(url = %nats.url, ?worker, ?settings, "Starting lathe-deployer");
        let stop = shutdown::on_signal();
        let readiness = health::Readiness::default();
        if let Some(addr) = health::addr_from_env()? {
            health::serve(addr, readiness.clone(), stop.clone()).await?;
        }
        let res = service::start("lathe-deployer", &nats, worker).await?;
        let client = res.client.clone();
        readiness.provisioned(client.clone());
        lathe_deployer::run(res, settings, args.http, readiness, stop).await?;
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
            eprintln!("lathe-deployer: {e}");
            ExitCode::FAILURE
        }
    }
}
