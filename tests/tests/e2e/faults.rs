//! Faults against real processes and a real server: nats-server restarted mid-batch, a flood
//! of malformed messages on every subject lathe listens to, a task altered on the way, a
//! corrupted artifact, and stage processes killed with SIGKILL at random while 20 jobs run.

use std::time::Duration;

use lathe_proto::{JobState, Stage, codec, names};
use lathe_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_job_completes_across_a_nats_server_restart() {
    let mut s = stack().await;
    let url = s.server.url();
    let mut trainer = spawn_service("lathe-trainer", &url, &[("LATHE_WORKER_ID", "restart")]);
    let mut jobs = Vec::new();
    for i in 0..4 {
        // Full-size jobs (seconds each) so the restart lands while tasks are in flight.
        let spec = format!(
            r#"{{"name": "restart-{i}", "dataset": {{"source": "builtin:digits"}}, "model": {{"hidden": [256, 128]}},
                "train": {{"epochs": 80, "patience": null, "seed": {i}}}}}"#
        );
        jobs.push(submit(&s.res, spec.as_bytes()).await);
    }
    // Let the batch get going, then crash the server (SIGKILL) and bring it back on the same
    // port and store.
    wait_event(
        &s.res,
        jobs[0],
        lathe_proto::EventKind::StageStarted,
        Duration::from_secs(30),
    )
    .await;
    s.server.restart();
    let (first, _) = s.res.jobs.get(jobs[0]).await.unwrap().unwrap();
    assert!(
        !first.state.is_terminal(),
        "the restart should land while the first job runs"
    );
    for job in jobs {
        let r = wait_job(&s.res, job, Duration::from_secs(180)).await;
        assert_eq!(r.state, JobState::Completed, "{job}: {:?}", r.error);
    }
    trainer.kill().unwrap();
    trainer.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_malformed_messages_leaves_every_service_serving() {
    let s = stack().await;
    let mut trainer = spawn_service("lathe-trainer", &s.server.url(), &[]);
    let mut deployer = spawn_service("lathe-deployer", &s.server.url(), &[]);
    let mut monitor = spawn_service("lathe-monitor", &s.server.url(), &[]);
    wait_for_deployers(&s.res.client, 1).await;
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        b"{".to_vec(),
        b"null".to_vec(),
        b"[1,2,3]".to_vec(),
        vec![0xde, 0xff, 0xff],
        vec![0x82, 0xa1, b'x', 0xc1],
        (0..=255u8).collect(),
        br#"{"name": 5}"#.to_vec(),
    ];
    let mut subjects = vec![names::SUBMIT_SUBJECT.to_string()];
    subjects.extend(Stage::ALL.iter().map(|s| names::work_subject(*s)));
    let flood_model: lathe_proto::ModelName = "flood".parse().unwrap();
    subjects.extend([
        names::infer_subject(&flood_model),
        "lathe.infer.a.b".to_string(),
        names::telemetry_subject(&flood_model),
        names::feedback_subject(&flood_model),
    ]);
    for _ in 0..10 {
        for subject in &subjects {
            for g in &garbage {
                s.res
                    .client
                    .publish(subject.clone(), g.clone().into())
                    .await
                    .unwrap();
            }
        }
    }
    s.res.client.flush().await.unwrap();
    // Garbage as inference requests that expect an answer: each gets an error reply.
    for g in &garbage {
        let reply = s
            .res
            .client
            .request(names::infer_subject(&flood_model), g.clone().into())
            .await
            .expect("an error reply, not silence");
        let code = reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .map(|c| c.as_str().to_string());
        assert!(code.is_some(), "garbage {g:?} was answered as if valid");
    }
    // A good job still goes through the whole chain, and every service is still running.
    let spec = br#"{"name": "after-the-flood", "dataset": {"source": "builtin:digits"},
        "model": {"hidden": [32]}, "train": {"epochs": 5, "patience": null, "seed": 1},
        "deploy": {"model": "flood"}, "monitor": {"smoke_rows": 5},
        "pipeline": ["train", "deploy", "monitor"]}"#;
    let job = submit(&s.res, spec).await;
    let r = wait_job(&s.res, job, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let row: Vec<f32> = lathe_model::data::builtin("digits")
        .unwrap()
        .1
        .row(0)
        .to_vec();
    let reply = s
        .res
        .client
        .request(
            names::infer_subject(&flood_model),
            serde_json::json!({"inputs": row}).to_string().into(),
        )
        .await
        .unwrap();
    let reply: lathe_proto::InferReply = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply.version, 1);
    assert!(trainer.try_wait().unwrap().is_none(), "the trainer exited");
    assert!(
        deployer.try_wait().unwrap().is_none(),
        "the deployer exited"
    );
    assert!(monitor.try_wait().unwrap().is_none(), "the monitor exited");
    // The garbage on the train subject was dead-lettered, not lost or retried forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let dead = dead_letters(&s.res).await;
        let train_dead = dead
            .iter()
            .filter(|d| d.subject == "lathe.work.train")
            .count();
        if train_dead >= 10 * garbage.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {train_dead} dead letters for lathe.work.train"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for mut child in [trainer, deployer, monitor] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_artifact_fails_its_job_naming_the_artifact() {
    let s = stack().await;
    let url = s.server.url();
    let (job, artifact) = trained_and_waiting_for_the_pruner(&s, "corrupt").await;
    let mut bytes = s.res.artifacts.get(&artifact).await.unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    store_raw(&s, &artifact.name, &bytes).await;

    let pruner = start_stage(&url, "p1", "lathe-pruner", lathe_pruner::Pruner).await;
    let r = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Failed);
    let error = r.error.unwrap_or_default();
    assert!(error.contains(&artifact.name), "{error}");
    assert!(error.contains("digest mismatch"), "{error}");
    assert_eq!(r.steps[1].attempts, 1, "a corrupt artifact is not retried");
    pruner.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_altered_on_the_way_fails_its_job_naming_the_fields_and_the_stage_serves_on() {
    let s = stack().await;
    let url = s.server.url();
    let (job, _) = trained_and_waiting_for_the_pruner(&s, "altered").await;
    // Replace the queued prune task with a copy whose spec breaks two of intake's rules
    // (MessagePack carries a NaN that JSON could not).
    let work = s.res.js.get_stream(names::WORK_STREAM).await.unwrap();
    let queued = work
        .get_last_raw_message_by_subject(&names::work_subject(Stage::Prune))
        .await
        .unwrap();
    let mut task: lathe_proto::StageTask = codec::from_msgpack(&queued.payload).unwrap();
    assert_eq!(task.job_id, job);
    let prune = task.spec.prune.as_mut().unwrap();
    prune.target_sparsity = lathe_proto::spec::AutoOr::Value(1.0);
    task.spec.budget.max_accuracy_drop = f64::NAN;
    assert!(work.delete_message(queued.sequence).await.unwrap());
    s.res
        .js
        .publish(
            names::work_subject(Stage::Prune),
            codec::to_msgpack(&task).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let pruner = start_stage(&url, "p1", "lathe-pruner", lathe_pruner::Pruner).await;
    let r = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Failed);
    let error = r.error.unwrap_or_default();
    assert_eq!(
        error,
        "prune failed: invalid task: \
         spec.budget.max_accuracy_drop: must be a fraction in [0, 1], got NaN; \
         spec.prune.target_sparsity: must be in [0, 1) or \"auto\", got 1"
    );
    assert_eq!(r.steps[1].state, lathe_proto::StepState::Failed);
    assert!(r.steps[1].artifact.is_none(), "nothing was pruned");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !dead_letters(&s.res)
        .await
        .iter()
        .any(|d| d.job_id == Some(job) && d.reason.starts_with("invalid task"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the altered task was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The same pruner takes the next, intact task.
    let (next, _) = trained_and_waiting_for_the_pruner(&s, "intact").await;
    let r = wait_job(&s.res, next, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    pruner.stop().await;
}

/// Kill -9 a random stage process again and again while 20 jobs run through train → deploy
/// into one model: every job completes exactly once and each has exactly one version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_while_twenty_jobs_run_lose_nothing_and_deploy_nothing_twice() {
    let s = stack().await;
    let url = s.server.url();
    let bins = [
        "lathe-trainer",
        "lathe-trainer",
        "lathe-deployer",
        "lathe-deployer",
    ];
    let mut procs: Vec<std::process::Child> =
        bins.iter().map(|b| spawn_service(b, &url, &[])).collect();
    wait_for_deployers(&s.res.client, 2).await;
    let mut jobs = Vec::new();
    for i in 0..20 {
        let spec = format!(
            r#"{{"name": "chaos-{i}", "dataset": {{"source": "builtin:digits"}},
                "model": {{"hidden": [32]}}, "train": {{"epochs": 60, "patience": null, "seed": {i}}},
                "deploy": {{"model": "chaos"}}, "pipeline": ["train", "deploy"]}}"#
        );
        jobs.push(submit(&s.res, spec.as_bytes()).await);
    }
    // A small deterministic generator is enough to pick victims.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut kills = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let mut open = 0;
        for job in &jobs {
            // A job not yet through intake has no record: it is open too.
            let ended = s
                .res
                .jobs
                .get(*job)
                .await
                .unwrap()
                .is_some_and(|(r, _)| r.state.is_terminal());
            open += usize::from(!ended);
        }
        if open == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} jobs still open"
        );
        let victim = (next() % procs.len() as u64) as usize;
        procs[victim].kill().unwrap(); // SIGKILL
        procs[victim].wait().unwrap();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        procs[victim] = spawn_service(bins[victim], &url, &[]);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    eprintln!("{kills} processes killed with SIGKILL while the 20 jobs ran");
    assert!(
        kills >= 3,
        "only {kills} kills: the jobs ended before the chaos began"
    );
    let model: lathe_proto::ModelName = "chaos".parse().unwrap();
    let (entry, _) = s.res.registry.get(&model).await.unwrap().unwrap();
    for job in &jobs {
        let (r, _) = s.res.jobs.get(*job).await.unwrap().unwrap();
        assert_eq!(r.state, JobState::Completed, "{job}: {:?}", r.error);
        let completed = events_of_ended(&s.res, *job, Duration::from_secs(10))
            .await
            .iter()
            .filter(|e| e.kind == lathe_proto::EventKind::Completed)
            .count();
        assert_eq!(completed, 1, "{job} completed {completed} times");
        let versions: Vec<u32> = entry
            .versions
            .iter()
            .filter(|v| v.job_id == *job)
            .map(|v| v.version)
            .collect();
        assert_eq!(versions.len(), 1, "{job} deployed {versions:?}");
        assert_eq!(r.steps[1].metrics["version"], f64::from(versions[0]));
    }
    assert_eq!(entry.versions.len(), 20);
    for mut p in procs {
        let _ = p.kill();
        let _ = p.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_emitted_while_the_events_stream_is_away_are_stored_in_order_when_it_returns() {
    use lathe_proto::{EventKind, JobId};
    use lathe_runtime::events::EventBuilder;

    let s = stack().await;
    // The events stream goes away (as while a cluster elects its leader: "no stream").
    let config = s
        .res
        .js
        .get_stream(names::EVENTS_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    s.res.js.delete_stream(names::EVENTS_STREAM).await.unwrap();

    let job = JobId::new();
    let kinds = [
        EventKind::StageStarted,
        EventKind::StageRetry,
        EventKind::StageStarted,
        EventKind::StageCompleted,
    ];
    for (i, kind) in kinds.iter().enumerate() {
        s.res
            .events
            .emit(EventBuilder::new(job, *kind, format!("event {i}")).step(0, Stage::Train))
            .await;
    }
    // Emitting did not wait for the server; the stream comes back a second later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.res.js.create_stream(config).await.unwrap();
    s.res.events.flush().await;

    let stored = events_of(&s.res, job).await;
    let got: Vec<(EventKind, String)> = stored.into_iter().map(|e| (e.kind, e.message)).collect();
    let want: Vec<(EventKind, String)> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| (*k, format!("event {i}")))
        .collect();
    assert_eq!(got, want, "every event stored once, in the order emitted");

    // A job's last event returns once it is stored, after the ones before it.
    s.res
        .events
        .emit(EventBuilder::new(
            job,
            EventKind::Completed,
            "job completed",
        ))
        .await;
    let stored = events_of(&s.res, job).await;
    assert_eq!(stored.len(), kinds.len() + 1);
    assert_eq!(stored.last().unwrap().kind, EventKind::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_whose_chunks_are_gone_is_an_error_naming_it_not_a_hang() {
    let s = stack().await;
    let bytes = vec![7u8; 300_000];
    let artifact = s.res.artifacts.put("chunkless.bin", &bytes).await.unwrap();
    assert_eq!(s.res.artifacts.get(&artifact).await.unwrap(), bytes);

    // The object's description stays; its data chunks are purged from the bucket's stream.
    purge_chunks(&s, "chunkless.bin").await;

    // Reads fail after 2 s without a byte here (30 s in a service).
    let store = s
        .res
        .artifacts
        .clone()
        .with_read_stall(Duration::from_secs(2));
    let read = tokio::time::timeout(Duration::from_secs(60), store.get(&artifact))
        .await
        .expect("the read gives up on its own instead of waiting for data that never comes");
    let err = read.expect_err("no bytes to return").to_string();
    assert!(err.contains("chunkless.bin"), "{err}");
    assert!(err.contains("no data"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_that_cannot_be_read_now_is_retried_and_the_job_completes() {
    let s = stack().await;
    let url = s.server.url();
    let (job, artifact) = trained_and_waiting_for_the_pruner(&s, "unreadable").await;
    // The trained artifact's chunks go: a read gets its description and then no data.
    let bytes = s.res.artifacts.get(&artifact).await.unwrap();
    purge_chunks(&s, &artifact.name).await;

    // A pruner whose reads give up after 1 s without a byte (30 s in a service).
    let mut res = connect(&url, "p1").await;
    res.artifacts = res
        .artifacts
        .clone()
        .with_read_stall(Duration::from_secs(1));
    let stop = tokio_util::sync::CancellationToken::new();
    let pruner = {
        let stop = stop.clone();
        tokio::spawn(async move {
            lathe_runtime::service::serve(res, "lathe-pruner", lathe_pruner::Pruner, stop)
                .await
                .expect("the pruner serves")
        })
    };
    let retry = wait_event(
        &s.res,
        job,
        lathe_proto::EventKind::StageRetry,
        Duration::from_secs(60),
    )
    .await;
    assert!(retry.message.contains(&artifact.name), "{}", retry.message);
    assert!(
        retry.message.contains("cannot be read now"),
        "{}",
        retry.message
    );
    // The data comes back (as when a cluster has elected the bucket's leader).
    store_raw(&s, &artifact.name, &bytes).await;
    let r = wait_job(&s.res, job, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    assert!(r.steps[1].attempts >= 2, "{}", r.steps[1].attempts);
    stop.cancel();
    pruner.await.unwrap();
}

/// Runs a train → prune job with only a trainer, so the job waits for a pruner with its
/// trained artifact stored: the job and that artifact.
async fn trained_and_waiting_for_the_pruner(
    s: &Stack,
    name: &str,
) -> (lathe_proto::JobId, lathe_proto::ArtifactRef) {
    let trainer = start_trainer(&s.server.url(), "t1").await;
    let spec = format!(
        r#"{{"name": "{name}", "dataset": {{"source": "builtin:digits"}}, "model": {{"hidden": [64]}},
        "train": {{"epochs": 5}}, "prune": {{"target_sparsity": 0.5, "steps": 1, "finetune_epochs": 1}},
        "pipeline": ["train", "prune"]}}"#
    );
    let job = submit(&s.res, spec.as_bytes()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let artifact = loop {
        let record = s.res.jobs.get(job).await.unwrap().map(|(r, _)| r);
        if let Some(step) = record.as_ref().map(|r| &r.steps[0])
            && step.state == lathe_proto::StepState::Completed
            && let Some(a) = step.artifact.clone()
        {
            break a;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the train step never completed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    trainer.stop().await;
    (job, artifact)
}

/// Purges an object's data chunks from the artifacts bucket's stream; its description stays,
/// so a read finds the object and then waits for data.
async fn purge_chunks(s: &Stack, name: &str) {
    let nuid = s.res.artifacts.raw().info(name).await.unwrap().nuid;
    s.res
        .js
        .get_stream(format!("OBJ_{}", names::ARTIFACTS_BUCKET))
        .await
        .unwrap()
        .purge()
        .filter(format!("$O.{}.C.{nuid}", names::ARTIFACTS_BUCKET))
        .await
        .unwrap();
}

/// Stores bytes under an artifact's name as they are (no digest kept anywhere).
async fn store_raw(s: &Stack, name: &str, bytes: &[u8]) {
    s.res
        .artifacts
        .raw()
        .put(name, &mut &bytes[..])
        .await
        .unwrap();
}
