//! Intake against a real server: plain NATS publishes of JSON and MessagePack, every invalid
//! example refused with its message, and specs published while nothing runs.

use std::collections::BTreeMap;
use std::time::Duration;

use lathe_proto::{EventKind, JobSpec, JobState, codec, names};
use lathe_testkit::otlp::OtlpReceiver;
use lathe_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_example_is_rejected_with_its_message() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let dir = proto_dir().join("examples/invalid");
    let expected: BTreeMap<String, String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let mut jobs = Vec::new();
    for (file, message) in &expected {
        let payload = std::fs::read(dir.join(file)).unwrap();
        jobs.push((file, message, submit(&s.res, &payload).await));
    }
    for (file, message, job) in jobs {
        let record = wait_job(&s.res, job, Duration::from_secs(20)).await;
        assert_eq!(record.state, JobState::Rejected, "{file}");
        let errors: Vec<String> = record.errors.iter().map(|e| e.to_string()).collect();
        assert!(
            errors.iter().any(|e| e.starts_with(message.as_str())),
            "{file}: expected {message:?} in {errors:?}"
        );
        let rejected = wait_event(&s.res, job, EventKind::Rejected, Duration::from_secs(5)).await;
        assert_eq!(
            rejected.errors, record.errors,
            "{file}: the event names the same fields"
        );
    }
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_msgpack_spec_is_accepted_and_runs() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let spec = JobSpec::parse(&quick_spec("msgpack", 2), codec::Format::Json).unwrap();
    let job = submit(&s.res, &codec::to_msgpack(&spec)).await;
    let record = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(record.state, JobState::Completed, "{:?}", record.error);
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_published_while_nothing_runs_is_processed_when_a_service_starts() {
    let s = stack().await;
    // The streams exist (provisioned), but no service runs.
    let job = submit(&s.res, &quick_spec("early", 2)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        s.res.jobs.get(job).await.unwrap().is_none(),
        "nothing should have processed the job yet"
    );
    let trainer = start_trainer(&s.server.url(), "late").await;
    let record = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(record.state, JobState::Completed, "{:?}", record.error);
    let kinds: Vec<EventKind> = events_of_ended(&s.res, job, Duration::from_secs(10))
        .await
        .iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds.first(), Some(&EventKind::Accepted));
    assert_eq!(kinds.last(), Some(&EventKind::Completed));
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_without_a_job_id_header_gets_one() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    s.res
        .client
        .publish(
            lathe_proto::names::SUBMIT_SUBJECT,
            quick_spec("no-header", 1).into(),
        )
        .await
        .unwrap();
    s.res.client.flush().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = s.res.jobs.list().await.unwrap();
        if let Some(r) = jobs
            .iter()
            .find(|r| r.name == "no-header" && r.state.is_terminal())
        {
            assert_eq!(r.state, JobState::Completed);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job never completed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_intake_off_leaves_submissions_to_one_with_it_on() {
    let s = stack().await;
    let url = s.server.url();
    // A bad LATHE_INTAKE stops the service at start, naming the variable.
    let out = std::process::Command::new(bin_dir().join("lathe-trainer"))
        .env("NATS_URL", &url)
        .env("LATHE_INTAKE", "maybe")
        .output()
        .expect("run lathe-trainer (build the binaries first: `cargo build --workspace --bins`)");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid setting LATHE_INTAKE"), "{stderr}");

    let mut worker = test_worker("no-intake");
    worker.intake = false;
    let res = lathe_runtime::service::start(
        "lathe-trainer",
        &lathe_runtime::NatsSettings::with_url(&url),
        worker,
    )
    .await
    .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let s2 = stop.clone();
    let handle = tokio::spawn(async move {
        lathe_runtime::service::serve(res, "lathe-trainer", lathe_trainer::Trainer, s2)
            .await
            .expect("serves");
    });
    let no_intake = InProcess { stop, handle };
    let job = submit(&s.res, &quick_spec("waits", 1)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        s.res.jobs.get(job).await.unwrap().is_none(),
        "a service with LATHE_INTAKE off accepted a job"
    );
    // A service running intake takes it; the first one trains it or this one does.
    let with_intake = start_trainer(&url, "with-intake").await;
    let record = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(record.state, JobState::Completed, "{:?}", record.error);
    no_intake.stop().await;
    with_intake.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_first_task_cannot_be_queued_fails_instead_of_waiting_for_ever() {
    let s = stack().await;
    // The service runs as a process exporting its spans, to see the job's trace end too.
    let receiver = OtlpReceiver::start().await;
    let trainer = spawn_service(
        "lathe-trainer",
        &s.server.url(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ],
    );
    // Once the process has provisioned (it then waits on its stage's consumer), an operator
    // shrinks the work stream's largest message below any task's size: the stream refuses
    // every first task.
    let mut work = s.res.js.get_stream(names::WORK_STREAM).await.unwrap();
    let train_consumer = names::stage_consumer(lathe_proto::Stage::Train);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting = match work.consumer_info(&train_consumer).await {
            Ok(info) => info.num_waiting,
            Err(_) => 0,
        };
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the trainer never pulled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut config = work.info().await.unwrap().config.clone();
    config.max_message_size = 64;
    s.res.js.update_stream(config).await.unwrap();

    let job = submit(&s.res, &quick_spec("unqueueable", 2)).await;
    // Intake tries each of its 5 deliveries, backing off 1, 2, 4 and 8 s in between.
    let record = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(record.state, JobState::Failed);
    let error = record.error.unwrap_or_default();
    // The reason says what gave up and the server's own words ("message size exceeds
    // maximum allowed").
    assert!(
        error.contains("intake could not queue the job after 5 deliveries")
            && error.contains("maximum"),
        "{error}"
    );
    wait_event(&s.res, job, EventKind::Failed, Duration::from_secs(5)).await;
    let letters = dead_letters(&s.res).await;
    let letter = letters
        .iter()
        .find(|l| l.job_id == Some(job))
        .expect("the submission is dead-lettered");
    assert_eq!(letter.subject, names::SUBMIT_SUBJECT);
    assert_eq!(letter.deliveries, 5);
    assert_eq!(
        letter.payload,
        quick_spec("unqueueable", 2),
        "the submission as it was sent"
    );

    // The job's trace ends: its root span, from submission to the give-up, has the error.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &trainer.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = trainer.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let spans = receiver.spans();
    let root = spans
        .iter()
        .find(|sp| sp.span_id == lathe_runtime::trace::root_span_id(job).to_bytes().to_vec())
        .unwrap_or_else(|| {
            let names: Vec<_> = spans.iter().map(|sp| &sp.name).collect();
            panic!("no root span among {names:?}")
        });
    assert_eq!(root.name, "job unqueueable");
    assert_eq!(root.trace_id, job.trace_id_bytes().to_vec());
    assert!(root.parent_span_id.is_empty());
    assert_eq!(root.status_code, 2, "the root span's status is an error");
    assert_eq!(
        root.start_unix_nano,
        record.submitted_at_ms * 1_000_000,
        "the root span starts at the submission"
    );
}
