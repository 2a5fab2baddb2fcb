//! `lathe-quantizer`: the quantize stage as a service. Reads its settings from the
//! environment, sets up telemetry, and serves until SIGTERM.

fn main() -> std::process::ExitCode {
    lathe_runtime::service::main("lathe-quantizer", lathe_quantizer::Quantizer)
}
