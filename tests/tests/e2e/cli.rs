//! The `lathe` command as scripts use it: its output piped into a reader that stops early.

use std::process::{Command, Stdio};
use std::time::Duration;

use lathe_proto::JobState;
use lathe_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_early_ends_the_listing_quietly_with_success() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let job = submit(&s.res, &quick_spec("piped", 1)).await;
    let r = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    trainer.stop().await;

    for args in [
        &["jobs"][..],
        &["--json", "jobs"],
        &["status", &job.to_string()],
    ] {
        // `lathe jobs | head -0`: the reader closes its end before the command writes.
        let mut child = Command::new(bin_dir().join("lathe"))
            .args(args)
            .env("NATS_URL", s.server.url())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run lathe (build the binaries first: `cargo build --workspace --bins`)");
        drop(child.stdout.take());
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "`lathe {}` with its reader gone: {}\n{stderr}",
            args.join(" "),
            out.status
        );
    }
    // With a reader, the same listing names the job.
    let listed = lathe_cli(&["jobs"], &[("NATS_URL", s.server.url())]).await;
    assert!(listed.contains(&job.to_string()), "{listed}");
}
