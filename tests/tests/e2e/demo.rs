//! The README's demo command: `lathe demo` runs the whole chain on the built-in digits data
//! against a NATS server, serves the result and prints one line per stage.

use std::process::Command;

use lathe_tests::bin_dir;

#[test]
fn the_demo_runs_the_whole_chain_and_serves_its_model() {
    let server = lathe_testkit::NatsServer::start();
    let out = Command::new(bin_dir().join("lathe"))
        .arg("demo")
        .env("NATS_URL", server.url())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run lathe demo (build the binaries first: `cargo build --workspace --bins`)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "lathe demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for stage in ["trained model", "distill", "prune", "quantize", "deploy"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{stage}: test accuracy")))
            .unwrap_or_else(|| panic!("no summary line for {stage}:\n{stdout}"));
        assert!(line.ends_with(" bytes"), "{line}");
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("monitor: smoke test through the live endpoint")),
        "{stdout}"
    );
    assert!(!stdout.contains("NaN"), "{stdout}");
    let served = stdout
        .lines()
        .find(|l| l.starts_with("served: digits v"))
        .unwrap_or_else(|| panic!("the model was not served:\n{stdout}"));
    // "351/360 built-in test rows right": most of the test split.
    let right: usize = served
        .split(": ")
        .nth(2)
        .and_then(|s| s.split('/').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{served}"));
    assert!(right >= 340, "{served}");
}
