//! `lathe gc` against a real server: the artifacts and records of ended jobs go, unless a
//! version in the model registry points to them; a dry run removes nothing.

use std::time::Duration;

use lathe_proto::{JobId, JobState};
use lathe_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_ended_jobs_artifacts_but_not_what_the_registry_points_to() {
    let s = stack().await;
    let url = s.server.url();
    let env = [("NATS_URL", url.clone())];
    let trainer = start_trainer(&url, "t1").await;
    let deployer = start_deployer(&url, "d1", serve_settings("d1")).await;
    let deployed = submit(&s.res, &deploy_spec("kept", "gc-model", "")).await;
    let deployed = wait_job(&s.res, deployed, Duration::from_secs(120)).await;
    assert_eq!(deployed.state, JobState::Completed, "{:?}", deployed.error);
    let plain = submit(&s.res, &quick_spec("dropped", 2)).await;
    let plain = wait_job(&s.res, plain, Duration::from_secs(60)).await;
    assert_eq!(plain.state, JobState::Completed, "{:?}", plain.error);
    let kept = deployed.steps[0]
        .artifact
        .clone()
        .expect("trained artifact");
    let dropped = plain.steps[0].artifact.clone().expect("trained artifact");

    // Nothing ended 30 days ago.
    assert!(lathe_gc(&[], &env).await.removed.is_empty());

    let dry = lathe_gc(&["--older-than-days", "0", "--dry-run"], &env).await;
    assert_eq!(removed_names(&dry), vec![dropped.name.clone()]);
    assert_eq!(dry.kept_in_registry, 1);
    assert_eq!(dry.removed_bytes, dropped.bytes);
    assert_eq!(dry.removed_jobs, vec![plain.job_id.to_string()]);
    assert_eq!(dry.kept_jobs_in_registry, 1);
    assert!(s.res.jobs.get(plain.job_id).await.unwrap().is_some());
    s.res
        .artifacts
        .get(&dropped)
        .await
        .expect("a dry run removes nothing");

    let done = lathe_gc(&["--older-than-days", "0"], &env).await;
    assert_eq!(removed_names(&done), vec![dropped.name.clone()]);
    assert!(s.res.artifacts.get(&dropped).await.is_err(), "removed");
    // The ended job's record goes after its artifacts; the deployed job's stays, so the
    // registered version's lineage still reads.
    assert_eq!(done.removed_jobs, vec![plain.job_id.to_string()]);
    assert!(s.res.jobs.get(plain.job_id).await.unwrap().is_none());
    // Not even the purge's marker stays behind.
    let jobs_stream = s
        .res
        .js
        .get_stream(format!("KV_{}", lathe_proto::names::JOBS_BUCKET))
        .await
        .unwrap();
    assert!(
        jobs_stream
            .get_last_raw_message_by_subject(&format!(
                "$KV.{}.{}",
                lathe_proto::names::JOBS_BUCKET,
                plain.job_id
            ))
            .await
            .is_err(),
        "the purged record left a message"
    );
    assert!(
        !s.res
            .jobs
            .list()
            .await
            .unwrap()
            .iter()
            .any(|r| r.job_id == plain.job_id)
    );
    assert!(s.res.jobs.get(deployed.job_id).await.unwrap().is_some());
    s.res
        .artifacts
        .get(&kept)
        .await
        .expect("the registered version's artifact stays");
    let again = lathe_gc(&["--older-than-days", "0"], &env).await;
    assert!(again.removed.is_empty() && again.removed_jobs.is_empty());

    trainer.stop().await;
    deployer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_forgets_old_versions_but_keeps_the_active_one_and_its_rollback_target() {
    let s = stack().await;
    let url = s.server.url();
    let env = [("NATS_URL", url.clone())];
    let trainer = start_trainer(&url, "t1").await;
    let deployer = start_deployer(&url, "d1", serve_settings("d1")).await;
    // Three deploys of one model: versions 1, 2 and 3; 3 is active, a rollback returns to 2.
    let mut records = Vec::new();
    for i in 1..=3 {
        let job = submit(&s.res, &deploy_spec(&format!("v{i}"), "gc-versions", "")).await;
        let record = wait_job(&s.res, job, Duration::from_secs(120)).await;
        assert_eq!(record.state, JobState::Completed, "{:?}", record.error);
        records.push(record);
    }
    let model: lathe_proto::ModelName = "gc-versions".parse().unwrap();
    let first = records[0].steps[0]
        .artifact
        .clone()
        .expect("deployed artifact");

    // Without --keep-versions every version's artifact stays.
    let plain = lathe_gc(&["--older-than-days", "0"], &env).await;
    assert!(plain.forgotten_versions.is_empty());
    assert_eq!(plain.kept_in_registry, 3, "{plain:?}");

    let dry = lathe_gc(
        &[
            "--older-than-days",
            "0",
            "--keep-versions",
            "0",
            "--dry-run",
        ],
        &env,
    )
    .await;
    assert_eq!(dry.forgotten_versions, vec![("gc-versions".to_string(), 1)]);
    assert_eq!(removed_names(&dry), vec![first.name.clone()]);
    let (entry, _) = s.res.registry.get(&model).await.unwrap().unwrap();
    assert_eq!(entry.versions.len(), 3, "a dry run changes nothing");

    let done = lathe_gc(&["--older-than-days", "0", "--keep-versions", "0"], &env).await;
    assert_eq!(
        done.forgotten_versions,
        vec![("gc-versions".to_string(), 1)]
    );
    assert_eq!(removed_names(&done), vec![first.name.clone()]);
    assert_eq!(done.removed_jobs, vec![records[0].job_id.to_string()]);
    let (entry, _) = s.res.registry.get(&model).await.unwrap().unwrap();
    let versions: Vec<u32> = entry.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, vec![2, 3]);
    assert!(s.res.artifacts.get(&first).await.is_err(), "removed");
    assert!(s.res.jobs.get(records[0].job_id).await.unwrap().is_none());

    // The rollback target still loads: traffic goes back to version 2.
    lathe_cli(&["rollback", "gc-versions"], &env).await;
    let (entry, _) = s.res.registry.get(&model).await.unwrap().unwrap();
    assert_eq!(entry.active, Some(2));
    trainer.stop().await;
    deployer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_job_records_returns_each_live_record_once_at_its_latest_revision() {
    let s = stack().await;
    let kv = s
        .res
        .js
        .get_key_value(lathe_proto::names::JOBS_BUCKET)
        .await
        .unwrap();
    let records: Vec<_> = (0..300)
        .map(|i| lathe_proto::JobRecord::rejected(JobId::new(), format!("r{i}"), vec![], 1_000 + i))
        .collect();
    for r in &records {
        assert!(s.res.jobs.create(r).await.unwrap());
    }
    // One record deleted, one purged, one rewritten twice, and a key that is not a job id.
    kv.delete(records[10].job_id.to_string()).await.unwrap();
    kv.purge(records[20].job_id.to_string()).await.unwrap();
    for round in 0..2 {
        s.res
            .jobs
            .update(records[30].job_id, |r| {
                r.name = format!("renamed {round}");
                lathe_runtime::jobs::Change::Write
            })
            .await
            .unwrap();
    }
    kv.put("not-a-job", "x".into()).await.unwrap();

    let listed = s.res.jobs.list_with_revisions().await.unwrap();
    assert_eq!(listed.len(), 298, "every live record once");
    let names: Vec<&str> = listed.iter().map(|(r, _)| r.name.as_str()).collect();
    assert!(!names.contains(&"r10") && !names.contains(&"r20"));
    assert!(names.contains(&"renamed 1") && !names.contains(&"r30"));
    // Oldest submission first, and each revision is the one a read of the record gives.
    assert!(
        listed
            .windows(2)
            .all(|w| w[0].0.submitted_at_ms <= w[1].0.submitted_at_ms)
    );
    for (record, revision) in listed.iter().step_by(37) {
        let (_, current) = s.res.jobs.get(record.job_id).await.unwrap().unwrap();
        assert_eq!(*revision, current, "{}", record.name);
    }
}
