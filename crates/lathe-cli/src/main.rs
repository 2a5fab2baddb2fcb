//! `lathe`: submit a job and watch it, inspect jobs, manage datasets, export models, run
//! every stage in one process (`up`), or the whole demo. A composition root: parsing here,
//! the work in the modules and the libraries.

/// `println!` for what a command prints: when the reader of standard output has gone
/// (`lathe jobs | head`), the command ends quietly with success, as ripgrep does, instead
/// of panicking. (Restoring the default SIGPIPE would also stop the panic, but the command
/// would die of the signal, status 141, which fails `lathe jobs | head -1` under `pipefail`.)
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for what a command prints; see `outln!`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*))
    };
}

mod cli;
mod commands;
mod local;
mod models;
mod session;
mod trace_view;
mod watch;

use std::io::Write;
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

/// Writes to standard output. A reader that went away ends the process with success: it took
/// what it wanted. Any other failure to write ends it with an error that says so.
pub(crate) fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("lathe: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}
