//! The prod overlay's 3-node NATS cluster, run here as three real nats-servers: with
//! `LATHE_STREAM_REPLICAS=3` every stream, bucket and object store lathe provisions keeps
//! three copies, a process without the setting leaves them so, and jobs still run and deploy
//! after the node leading the work stream dies.

use std::time::Duration;

use lathe_proto::{JobId, JobState, names};
use lathe_runtime::{NatsSettings, Resources, WorkerSettings, service};
use lathe_testkit::NatsCluster;
use lathe_tests::*;
use tokio::time::Instant;

/// Every stream behind lathe's streams, buckets and object stores.
const STREAMS: [&str; 10] = [
    names::SUBMIT_STREAM,
    names::WORK_STREAM,
    names::EVENTS_STREAM,
    names::DEAD_STREAM,
    names::ALERTS_STREAM,
    "KV_lathe-jobs",
    "KV_lathe-models",
    "KV_lathe-health",
    "OBJ_lathe-artifacts",
    "OBJ_lathe-datasets",
];

/// Provisions once the cluster has elected its JetStream meta leader (a moment after the
/// nodes meet).
async fn provision_when_ready(urls: &str, worker: WorkerSettings) -> Resources {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match service::start("lathe-test", &NatsSettings::with_url(urls), worker.clone()).await {
            Ok(res) => return res,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the cluster never took lathe's resources: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn replicas(res: &Resources, stream: &str) -> (usize, String) {
    let mut s = res
        .js
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("{stream}: {e}"));
    let info = s.info().await.unwrap();
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .unwrap_or_default();
    (info.config.num_replicas, leader)
}

/// Publishes a spec through JetStream and waits for the stream's acknowledgement, trying
/// again while the cluster elects new leaders.
async fn submit_acked(res: &Resources, spec: &[u8]) -> JobId {
    let job = JobId::new();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(names::JOB_ID_HEADER, job.to_string().as_str());
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        job.to_string().as_str(),
    );
    lathe_runtime::publish::publish_acked(
        &res.js,
        names::SUBMIT_SUBJECT,
        headers,
        spec.to_vec().into(),
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|e| panic!("the submit stream never took the job: {e}"));
    job
}

fn spec(name: &str) -> Vec<u8> {
    format!(
        r#"{{"name": "{name}", "dataset": {{"source": "builtin:digits"}}, "model": {{"hidden": [32]}},
            "train": {{"epochs": 5, "patience": null, "seed": 1}},
            "pipeline": ["train", "quantize", "deploy"], "quantize": {{"bits": 8}},
            "deploy": {{"model": "clustered"}}}}"#
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_copies_of_every_stream_keep_jobs_running_when_a_node_dies() {
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let mut worker = test_worker("cluster-provision");
    worker.stream_replicas = Some(3);
    let res = provision_when_ready(&urls, worker).await;
    for stream in STREAMS {
        assert_eq!(replicas(&res, stream).await.0, 3, "{stream}");
    }

    // Stages started without the setting (as a process with a partial environment would be)
    // leave the copies as they are.
    let trainer = start_trainer(&urls, "cluster-trainer").await;
    let deployer = start_deployer(&urls, "cluster-deployer", serve_settings("d1")).await;
    let quantizer = start_stage(
        &urls,
        "cluster-quantizer",
        "lathe-quantizer",
        lathe_quantizer::Quantizer,
    )
    .await;
    for stream in STREAMS {
        assert_eq!(
            replicas(&res, stream).await.0,
            3,
            "{stream} after a start without the setting"
        );
    }

    let first = submit_acked(&res, &spec("before-the-loss")).await;
    let first = wait_job(&res, first, Duration::from_secs(120)).await;
    assert_eq!(first.state, JobState::Completed, "{:?}", first.error);
    let artifact = first.steps[1]
        .artifact
        .clone()
        .expect("the quantizer's artifact");

    // The node leading the work stream dies; the other two still hold a majority of every
    // stream's copies.
    let (_, leader) = replicas(&res, names::WORK_STREAM).await;
    cluster.node_named(&leader).stop();

    let second = submit_acked(&res, &spec("after-the-loss")).await;
    let second = wait_job(&res, second, Duration::from_secs(120)).await;
    assert_eq!(second.state, JobState::Completed, "{:?}", second.error);
    assert!(second.steps[1].metrics["test_accuracy"] > 0.8);
    // What was stored before the loss is still there.
    let bytes = res
        .artifacts
        .get(&artifact)
        .await
        .expect("the first job's artifact");
    lathe_model::artifact::Artifact::from_bytes(&bytes).expect("a readable artifact");
    let (_, new_leader) = replicas(&res, names::WORK_STREAM).await;
    assert_ne!(new_leader, leader);

    // The deployer followed the registry through the loss and serves the second version.
    let row: Vec<f32> = lathe_model::data::builtin("digits")
        .unwrap()
        .1
        .row(0)
        .to_vec();
    let body = serde_json::json!({ "inputs": row }).to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = res
            .client
            .request("lathe.infer.clustered", body.clone().into())
            .await;
        let version = reply
            .ok()
            .and_then(|r| serde_json::from_slice::<lathe_proto::InferReply>(&r.payload).ok())
            .map(|r| r.version);
        if version == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deployer serves {version:?}, not version 2"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    trainer.stop().await;
    quantizer.stop().await;
    deployer.stop().await;
}
