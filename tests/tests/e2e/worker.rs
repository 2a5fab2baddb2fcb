//! The stage worker against a real server: replicas share a consumer, a killed worker's task
//! is redelivered and its job completes once, poison tasks end in the dead-letter stream.

use std::collections::BTreeSet;
use std::time::Duration;

use lathe_proto::{EventKind, JobState, names};
use lathe_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_a_batch_of_tasks() {
    let s = stack().await;
    let a = start_trainer(&s.server.url(), "replica-a").await;
    let b = start_trainer(&s.server.url(), "replica-b").await;
    let mut jobs = Vec::new();
    for i in 0..8 {
        jobs.push(submit(&s.res, &quick_spec(&format!("batch-{i}"), 15)).await);
    }
    let mut workers = BTreeSet::new();
    for job in jobs {
        let r = wait_job(&s.res, job, Duration::from_secs(120)).await;
        assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
        assert_eq!(r.steps[0].attempts, 1, "no task was processed twice");
        workers.insert(r.steps[0].worker.clone().unwrap());
        let completed = events_of_ended(&s.res, job, Duration::from_secs(10))
            .await
            .iter()
            .filter(|e| e.kind == EventKind::Completed)
            .count();
        assert_eq!(completed, 1);
    }
    assert_eq!(
        workers,
        BTreeSet::from(["replica-a".to_string(), "replica-b".to_string()]),
        "both replicas took tasks"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_has_its_task_redelivered_and_the_job_completes_once() {
    let s = stack().await;
    let url = s.server.url();
    let mut first = spawn_service("lathe-trainer", &url, &[("LATHE_WORKER_ID", "doomed")]);
    // Long enough (hundreds of epochs of the full-size MLP) that the kill lands mid-training.
    let spec = br#"{"name": "survivor", "dataset": {"source": "builtin:digits"}, "model": {"hidden": [256, 128]},
        "train": {"epochs": 300, "patience": null}}"#;
    let job = submit(&s.res, spec).await;
    // Kill it (SIGKILL, no clean stop) once it is training.
    wait_event(&s.res, job, EventKind::Progress, Duration::from_secs(60)).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let mut second = spawn_service("lathe-trainer", &url, &[("LATHE_WORKER_ID", "heir")]);
    let r = wait_job(&s.res, job, Duration::from_secs(180)).await;
    second.kill().unwrap();
    second.wait().unwrap();
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    assert_eq!(
        r.steps[0].attempts, 2,
        "one delivery to the killed worker, one to the heir: {r:#?}"
    );
    assert_eq!(r.steps[0].worker.as_deref(), Some("heir"));
    let events = events_of_ended(&s.res, job, Duration::from_secs(10)).await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::Completed)
            .count(),
        1
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::StageStarted)
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_task_is_dead_lettered_and_its_job_failed_with_the_reason() {
    let s = stack().await;
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let spec = br#"{"name": "poison", "dataset": {"source": "bucket:no-such-data"}, "train": {"epochs": 1}}"#;
    let job = submit(&s.res, spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(30)).await;
    assert_eq!(r.state, JobState::Failed);
    let reason = r.error.unwrap();
    assert!(
        reason.contains("dataset `no-such-data`: not found in bucket lathe-datasets"),
        "{reason}"
    );
    assert_eq!(r.steps[0].attempts, 1, "bad input is not retried");

    // A payload that is not a task at all, straight onto the work subject.
    s.res
        .js
        .publish(
            names::work_subject(lathe_proto::Stage::Train),
            "not a task".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let dead = dead_letters(&s.res).await;
        let poison = dead.iter().find(|d| d.job_id == Some(job));
        let garbage = dead.iter().find(|d| d.payload == b"not a task");
        if let (Some(p), Some(g)) = (poison, garbage) {
            assert!(p.reason.contains("no-such-data"), "{}", p.reason);
            assert_eq!(p.subject, "lathe.work.train");
            assert!(g.reason.starts_with("undecodable task"), "{}", g.reason);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dead letters missing: {dead:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The work stream holds nothing more for the stage: both were removed.
    let mut work = s.res.js.get_stream(names::WORK_STREAM).await.unwrap();
    assert_eq!(work.info().await.unwrap().state.messages, 0);
    trainer.stop().await;
}
