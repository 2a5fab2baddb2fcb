//! `lathe-deployer`: the deploy stage and inference serving as one service. Settings come
//! from the environment (as every service's) plus `--http ADDR` / `LATHE_HTTP_ADDR` for the
//! optional Open Inference Protocol HTTP front.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

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
    lathe_runtime::service::main_with("lathe-deployer", move |res, readiness, stop| async move {
        let settings = lathe_deployer::ServeSettings::from_env()?;
        tracing::info!(?settings, "Serving settings");
        lathe_deployer::run(res, settings, args.http, readiness, stop).await
    })
}
