//! `lathe gc` against a real server: the artifacts and records of ended jobs go, unless a
//! version in the model registry points to them; a dry run removes nothing.

use std::time::Duration;

use lathe_proto::JobState;
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
