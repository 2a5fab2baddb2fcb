//! The `lathe` command as scripts use it: its output piped into a reader that stops early;
//! `lathe watch` on a job whose events have expired, and on one that has no record yet.

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
        let mut child = lathe(&s.server.url(), args)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_answers_from_the_record_once_a_jobs_events_have_expired() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let done = submit(&s.res, &quick_spec("expired", 1)).await;
    let poison = br#"{"name": "expired-failed", "dataset": {"source": "bucket:no-such-data"}, "train": {"epochs": 1}}"#;
    let failed = submit(&s.res, poison).await;
    assert_eq!(
        wait_job(&s.res, done, Duration::from_secs(60)).await.state,
        JobState::Completed
    );
    assert_eq!(
        wait_job(&s.res, failed, Duration::from_secs(60))
            .await
            .state,
        JobState::Failed
    );
    trainer.stop().await;
    // The events stream keeps a job's events for 7 days; its record stays until `lathe gc`.
    for job in [done, failed] {
        events_of_ended(&s.res, job, Duration::from_secs(10)).await;
        s.res
            .js
            .get_stream(lathe_proto::names::EVENTS_STREAM)
            .await
            .unwrap()
            .purge()
            .filter(lathe_proto::names::job_events_filter(job))
            .await
            .unwrap();
        assert!(events_of(&s.res, job).await.is_empty());
    }

    let watch = |job: lathe_proto::JobId| {
        let url = s.server.url();
        async move { run_lathe(&url, vec!["watch".into(), job.to_string()]).await }
    };
    let out = watch(done).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {stdout}", out.status);
    assert!(
        stdout.contains(&format!("job {done}  expired  Completed")),
        "{stdout}"
    );
    let out = watch(failed).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-data"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_says_so_when_a_job_has_no_record_yet_and_waits_for_it() {
    let s = stack().await;
    let job = lathe_proto::JobId::new();
    let mut child = lathe(&s.server.url(), &["watch", &job.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line);
        let _ = tx.send(line);
    });
    let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
        child.kill().unwrap();
        panic!("nothing on stderr within 30 s");
    };
    assert!(
        line.starts_with(&format!(
            "lathe: no record of job {job} yet; waiting for its events"
        )),
        "{line}"
    );
    assert!(child.try_wait().unwrap().is_none(), "it waits");
    // The job arrives (published with that id while nothing ran): the watch follows it to the end.
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(lathe_proto::names::JOB_ID_HEADER, job.to_string().as_str());
    s.res
        .client
        .publish_with_headers(
            lathe_proto::names::SUBMIT_SUBJECT,
            headers,
            quick_spec("late", 1).into(),
        )
        .await
        .unwrap();
    let status = wait_or_kill(child, Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
    trainer.stop().await;
}

/// `lathe <args>` against the server at `url`, logging only warnings.
fn lathe(url: &str, args: &[impl AsRef<std::ffi::OsStr>]) -> Command {
    let mut cmd = Command::new(bin_dir().join("lathe"));
    cmd.args(args).env("NATS_URL", url).env("RUST_LOG", "warn");
    cmd
}

/// Runs `lathe <args>` against `url` to its end: its output. One still running after 30 s is
/// killed (and its status says so), so a test fails rather than hangs.
async fn run_lathe(url: &str, args: Vec<String>) -> std::process::Output {
    let child = lathe(url, &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = child.id();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(Duration::from_secs(30), output).await {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &id.to_string()]).status();
            panic!("`lathe {}` still ran after 30 s", args.join(" "));
        }
    }
}

/// Waits for a child to exit; one still running after `limit` is killed, failing the test.
async fn wait_or_kill(mut child: std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("still running after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
