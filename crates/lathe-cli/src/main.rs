//! `lathe`: submit a job and watch it, inspect jobs, manage datasets, export models, run
//! every stage in one process (`up`), or the whole demo. A composition root: parsing here,
//! the work in the modules and the libraries.

mod cli;
mod commands;
mod local;
mod models;
mod session;
mod trace_view;
mod watch;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lathe: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The demo keeps the terminal for its progress and result: warnings only, unless RUST_LOG.
    let level = if matches!(args.command, cli::Command::Demo) {
        "warn"
    } else {
        "info"
    };
    let telemetry = args.command.runs_services().then(|| {
        runtime.block_on(async { lathe_runtime::trace::init_telemetry_with("lathe", level) })
    });
    let result = runtime.block_on(commands::run(args));
    // Flush spans while the runtime that drives the gRPC exporter still runs.
    if let Some(t) = telemetry {
        t.shutdown();
    }
    drop(runtime);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lathe: {e:#}");
            ExitCode::from(1)
        }
    }
}
