//! The deployer through real NATS: a job's deploy step registers and activates a version
//! whose endpoint answers as the engine does; a failed gate promotes nothing; a 10 % canary
//! gets about 10 % of the traffic; rollback reaches every replica; replicas share load; a
//! redelivered deploy task registers one version; bad requests get errors and the replica
//! keeps serving; replies and telemetry respect the server's max_payload; the binary's HTTP
//! front speaks the Open Inference Protocol and is ready only once its models are loaded.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use futures::StreamExt;
use lathe_model::artifact::Artifact;
use lathe_model::engine::Engine;
use lathe_proto::{InferReply, JobId, JobState, ModelName, Stage, StageTask, StepState, codec};
use lathe_runtime::jobs::Change;
use lathe_tests::*;

/// Sends one request; `Ok(reply)` or `Err((code, message))` for a service error.
async fn ask(
    client: &async_nats::Client,
    model: &str,
    body: Vec<u8>,
    content_type: &str,
) -> Result<async_nats::Message, (String, String)> {
    let mut h = HeaderMap::new();
    h.insert("Content-Type", content_type);
    let msg = tokio::time::timeout(
        Duration::from_secs(5),
        client.request_with_headers(format!("lathe.infer.{model}"), h, body.into()),
    )
    .await
    .expect("an answer within 5 s")
    .expect("a reply");
    if let Some(h) = &msg.headers
        && let Some(err) = h.get("Nats-Service-Error")
    {
        let code = h
            .get("Nats-Service-Error-Code")
            .unwrap()
            .as_str()
            .to_string();
        return Err((code, err.as_str().to_string()));
    }
    Ok(msg)
}

async fn ask_json(client: &async_nats::Client, model: &str, body: serde_json::Value) -> InferReply {
    let msg = ask(
        client,
        model,
        body.to_string().into_bytes(),
        "application/json",
    )
    .await
    .expect("a good request is answered");
    serde_json::from_slice(&msg.payload).expect("an InferReply")
}

fn test_rows(n: usize) -> (Vec<Vec<f32>>, Vec<f32>) {
    let (_, test) = lathe_model::data::builtin("digits").unwrap();
    let w = test.n_features;
    let rows: Vec<Vec<f32>> = (0..n)
        .map(|i| test.features[i * w..(i + 1) * w].to_vec())
        .collect();
    let flat = rows.concat();
    (rows, flat)
}

async fn deploy_job(s: &Stack, name: &str, model: &str, deploy: &str) -> lathe_proto::JobRecord {
    let job = submit(&s.res, &deploy_spec(name, model, deploy)).await;
    wait_job(&s.res, job, Duration::from_secs(120)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployed_version_answers_as_the_engine_does() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let deployer = start_deployer(&url, "d1", serve_settings("d1")).await;
    let r = deploy_job(&s, "dep-a", "digits-a", r#", "min_accuracy": 0.8"#).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let step = &r.steps[1];
    assert_eq!(step.stage, Stage::Deploy);
    assert_eq!(step.metrics["version"], 1.0);
    assert!(step.metrics["test_accuracy"] >= 0.8);
    assert!(step.metrics["p99_latency_ms"] > 0.0);

    let model: ModelName = "digits-a".parse().unwrap();
    let (entry, _) = s
        .res
        .registry
        .get(&model)
        .await
        .unwrap()
        .expect("registered");
    assert_eq!(entry.active, Some(1));
    assert_eq!(entry.versions.len(), 1);
    let trained = r.steps[0].artifact.clone().unwrap();
    assert_eq!(
        entry.versions[0].artifact, trained,
        "the registry points at the artifact"
    );
    assert_eq!(entry.versions[0].job_id, r.job_id);

    // The endpoint's answers are the engine's on the same rows.
    let bytes = s.res.artifacts.get(&trained).await.unwrap();
    let engine = Engine::from_artifact(&Artifact::from_bytes(&bytes).unwrap()).unwrap();
    let (rows, flat) = test_rows(40);
    let expected = engine.predict_batch(&flat, rows.len()).unwrap();
    let reply = ask_json(
        &s.res.client,
        "digits-a",
        serde_json::json!({"id": "b1", "inputs": rows}),
    )
    .await;
    assert_eq!((reply.version, reply.id.as_deref()), (1, Some("b1")));
    assert_eq!(reply.predictions.len(), 40);
    for (got, want) in reply.predictions.iter().zip(&expected) {
        assert_eq!(got.class as usize, want.class);
        assert_eq!(got.label, engine.class_labels()[want.class]);
        for (a, b) in got.probabilities.iter().zip(&want.probabilities) {
            assert!((a - b).abs() < 1e-6);
        }
    }
    // One row, MessagePack.
    let body = rmp_serde::to_vec_named(&serde_json::json!({"inputs": rows[3]})).unwrap();
    let msg = ask(&s.res.client, "digits-a", body, "application/msgpack")
        .await
        .unwrap();
    let one: InferReply = codec::from_msgpack(&msg.payload).unwrap();
    assert_eq!(one.predictions[0].class as usize, expected[3].class);
    // The Open Inference Protocol's shape gets its response shape.
    let oip = serde_json::json!({"id": "o1", "inputs": [{"name": "input-0", "shape": [2, 64], "datatype": "FP32", "data": flat[..128]}]});
    let msg = ask(
        &s.res.client,
        "digits-a",
        oip.to_string().into_bytes(),
        "application/json",
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(v["model_name"], "digits-a");
    assert_eq!(v["model_version"], "1");
    assert_eq!(v["outputs"][0]["name"], "predicted_class");
    assert_eq!(
        v["outputs"][0]["data"],
        serde_json::json!([expected[0].class, expected[1].class])
    );
    assert_eq!(v["outputs"][1]["shape"], serde_json::json!([2, 10]));

    // Discoverable as a NATS service.
    let ping = s
        .res
        .client
        .request("$SRV.PING.lathe-deployer", "".into())
        .await
        .unwrap();
    let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "lathe-deployer");
    deployer.stop().await;
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_gate_promotes_nothing() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let deployer = start_deployer(&url, "d1", serve_settings("d1")).await;
    let first = deploy_job(&s, "gate-1", "digits-g", "").await;
    assert_eq!(first.state, JobState::Completed, "{:?}", first.error);
    let failed = deploy_job(
        &s,
        "gate-2",
        "digits-g",
        r#", "min_accuracy": 0.999, "p99_latency_ms": 0.000001"#,
    )
    .await;
    assert_eq!(failed.state, JobState::Failed);
    let err = failed.error.clone().unwrap();
    assert!(err.contains("nothing was promoted"), "{err}");
    assert!(
        err.contains("deploy.min_accuracy") && err.contains("below the minimum 0.9990"),
        "{err}"
    );
    assert!(
        err.contains("deploy.p99_latency_ms") && err.contains("over the budget 0.000001 ms"),
        "{err}"
    );
    assert_eq!(failed.steps[1].state, StepState::Failed);
    let model: ModelName = "digits-g".parse().unwrap();
    let (entry, _) = s.res.registry.get(&model).await.unwrap().unwrap();
    assert_eq!((entry.active, entry.versions.len()), (Some(1), 1));
    let reply = ask_json(
        &s.res.client,
        "digits-g",
        serde_json::json!({"inputs": test_rows(1).0[0]}),
    )
    .await;
    assert_eq!(reply.version, 1);
    deployer.stop().await;
    trainer.stop().await;
}

/// Collects `$SRV.STATS` answers from every replica: requests per replica id.
async fn requests_per_replica(client: &async_nats::Client) -> HashMap<String, u64> {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("$SRV.STATS.lathe-deployer", inbox, "".into())
        .await
        .unwrap();
    let mut out = HashMap::new();
    let deadline = tokio::time::sleep(Duration::from_millis(500));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            m = sub.next() => {
                let v: serde_json::Value = serde_json::from_slice(&m.unwrap().payload).unwrap();
                let n = v["endpoints"].as_array().unwrap().iter().map(|e| e["num_requests"].as_u64().unwrap()).sum();
                out.insert(v["id"].as_str().unwrap().to_string(), n);
            }
            _ = &mut deadline => break,
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_share_rollback_and_replicas() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let d1 = start_deployer(&url, "d1", serve_settings("d1")).await;
    let d2 = start_deployer(&url, "d2", serve_settings("d2")).await;
    let v1 = deploy_job(&s, "can-1", "digits-c", "").await;
    assert_eq!(v1.state, JobState::Completed, "{:?}", v1.error);
    let v2 = deploy_job(
        &s,
        "can-2",
        "digits-c",
        r#", "strategy": "canary", "canary_percent": 10"#,
    )
    .await;
    assert_eq!(v2.state, JobState::Completed, "{:?}", v2.error);
    assert_eq!(v2.steps[1].metrics["version"], 2.0);
    assert_eq!(v2.steps[1].metrics["canary_percent"], 10.0);
    let model: ModelName = "digits-c".parse().unwrap();
    let (entry, _) = s.res.registry.get(&model).await.unwrap().unwrap();
    assert_eq!(entry.serving(), vec![(1, 90.0), (2, 10.0)]);

    // Both replicas route to both versions once they have loaded v2.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let row = serde_json::json!({"inputs": test_rows(1).0[0]});
    let mut canary = 0;
    let n = 2000;
    for _ in 0..n {
        let r = ask_json(&s.res.client, "digits-c", row.clone()).await;
        assert!(r.version == 1 || r.version == 2);
        canary += (r.version == 2) as u32;
    }
    // Binomial(2000, 0.1): mean 200, sd 13.4; these bounds are 4.5 sd wide.
    assert!(
        (140..=260).contains(&canary),
        "canary answered {canary} of {n}"
    );

    // The two replicas share the load (queue group).
    let per_replica = requests_per_replica(&s.res.client).await;
    assert_eq!(per_replica.len(), 2, "{per_replica:?}");
    assert!(per_replica.values().all(|&n| n >= 200), "{per_replica:?}");

    // Rolling back the canary reaches every replica: a second later, only v1 answers.
    let (_, active) = s
        .res
        .registry
        .update(&model, false, |e| {
            e.rollback(None, "test", "canary rolled back")
        })
        .await
        .unwrap();
    assert_eq!(active, 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..300 {
        assert_eq!(
            ask_json(&s.res.client, "digits-c", row.clone())
                .await
                .version,
            1
        );
    }
    // Promote v2 by hand, then roll back to the version active before it.
    s.res
        .registry
        .update(&model, false, |e| e.promote(2, "test", "by hand"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..100 {
        assert_eq!(
            ask_json(&s.res.client, "digits-c", row.clone())
                .await
                .version,
            2
        );
    }
    let (entry, active) = s
        .res
        .registry
        .update(&model, false, |e| e.rollback(None, "test", "bad"))
        .await
        .unwrap();
    assert_eq!(active, 1);
    assert_eq!(entry.history.len(), 5, "{:?}", entry.history);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..100 {
        assert_eq!(
            ask_json(&s.res.client, "digits-c", row.clone())
                .await
                .version,
            1
        );
    }
    d1.stop().await;
    d2.stop().await;
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_deploy_task_registers_one_version() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let deployer = start_deployer(&url, "d1", serve_settings("d1")).await;
    let r = deploy_job(&s, "redo", "digits-r", "").await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    // As if the deployer died after registering but before recording its step: the step
    // is running again and its task comes back.
    s.res
        .jobs
        .update(r.job_id, |rec| {
            rec.state = JobState::Running;
            rec.finished_at_ms = None;
            rec.steps[1].state = StepState::Running;
            Change::Write
        })
        .await
        .unwrap();
    let task = StageTask {
        schema_version: 1,
        job_id: r.job_id,
        step: 1,
        stage: Stage::Deploy,
        spec: r.spec.clone().unwrap(),
        input: r.steps[0].artifact.clone(),
        accepted_at_ms: r.submitted_at_ms,
    };
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", format!("{}:redelivered", r.job_id).as_str());
    s.res
        .js
        .publish_with_headers("lathe.work.deploy", h, codec::to_msgpack(&task).into())
        .await
        .unwrap()
        .await
        .unwrap();
    let done = wait_until_completed(&s, r.job_id).await;
    assert_eq!(done.steps[1].attempts, 2, "the task really ran again");
    assert_eq!(done.steps[1].metrics["version"], 1.0);
    let model: ModelName = "digits-r".parse().unwrap();
    let (entry, _) = s.res.registry.get(&model).await.unwrap().unwrap();
    assert_eq!(entry.versions.len(), 1, "{:?}", entry.versions);
    deployer.stop().await;
    trainer.stop().await;
}

async fn wait_until_completed(s: &Stack, job: JobId) -> lathe_proto::JobRecord {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (r, _) = s.res.jobs.get(job).await.unwrap().unwrap();
        if r.state == JobState::Completed {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "job {job} did not complete again: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_replica_keeps_serving() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let settings = lathe_deployer::ServeSettings {
        max_batch_rows: 16,
        ..serve_settings("d1")
    };
    let deployer = start_deployer(&url, "d1", settings).await;
    let r = deploy_job(&s, "bad", "digits-b", "").await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let good = serde_json::json!({"inputs": test_rows(1).0[0]});
    let (rows, _) = test_rows(17);
    let mut non_numeric = test_rows(1).0[0]
        .iter()
        .map(|&x| serde_json::json!(x))
        .collect::<Vec<_>>();
    non_numeric[2] = serde_json::json!("seven");
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "digits-b",
            br#"{"inputs": [1, 2, 3]}"#.to_vec(),
            "400",
            "inputs: expected 64 features, got 3",
        ),
        (
            "digits-b",
            serde_json::json!({"inputs": non_numeric})
                .to_string()
                .into_bytes(),
            "400",
            "inputs[2]: expected a number, got a string \"seven\"",
        ),
        (
            "nope",
            good.to_string().into_bytes(),
            "404",
            "unknown model `nope`",
        ),
        (
            "digits-b",
            serde_json::json!({"inputs": rows}).to_string().into_bytes(),
            "413",
            "a batch of 17 rows is over this server's limit of 16",
        ),
        (
            "digits-b",
            b"{\"inputs\": [1, 2".to_vec(),
            "400",
            "request is not valid JSON",
        ),
        (
            "digits-b",
            vec![0xc1, 0x00, 0xff],
            "400",
            "not valid MessagePack",
        ),
        (
            "bad.model",
            good.to_string().into_bytes(),
            "404",
            "unknown model",
        ),
    ];
    for (model, body, code, message) in cases {
        let ct = if body.first() == Some(&0xc1) {
            "application/msgpack"
        } else {
            "application/json"
        };
        let err = ask(&s.res.client, model, body, ct).await.err();
        let (got_code, got) = err.unwrap_or_else(|| panic!("{model}: `{message}` was answered"));
        assert_eq!(got_code, code, "{got}");
        assert!(got.contains(message), "`{got}` should say `{message}`");
        // The next good request is answered.
        assert_eq!(
            ask_json(&s.res.client, "digits-b", good.clone())
                .await
                .version,
            1
        );
    }
    deployer.stop().await;
    trainer.stop().await;
}

fn http_get(url: &str) -> (u16, String) {
    match ureq::get(url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_the_open_inference_protocol_over_http_once_loaded() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    // A registry entry whose artifact is missing: a replica cannot load it, so it is not ready.
    let model: ModelName = "digits-h".parse().unwrap();
    let bogus = lathe_proto::registry::NewVersion {
        job_id: JobId::new(),
        step: 1,
        artifact: lathe_proto::ArtifactRef {
            bucket: "lathe-artifacts".into(),
            name: "missing/1-train".into(),
            digest: "SHA-256=AAAA".into(),
            bytes: 4,
        },
        metrics: Default::default(),
        lineage: vec![],
        strategy: lathe_proto::spec::DeployStrategy::Replace,
        canary_percent: 10.0,
    };
    s.res
        .registry
        .update(&model, true, |e| Ok(e.register(bogus.clone(), "test")))
        .await
        .unwrap();
    let port = lathe_testkit::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn_service(
        "lathe-deployer",
        &url,
        &[
            ("LATHE_HTTP_ADDR", &format!("127.0.0.1:{port}")),
            ("LATHE_WORKER_ID", "dh"),
        ],
    );
    let ready = format!("{base}/v2/health/ready");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (code, body) = loop {
        let b = ready.clone();
        let (code, body) = tokio::task::spawn_blocking(move || http_get(&b))
            .await
            .unwrap();
        if body.contains("not loaded") || Instant::now() > deadline {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("model `digits-h` is not loaded"), "{body}");
    let live = format!("{base}/v2/health/live");
    assert_eq!(
        tokio::task::spawn_blocking(move || http_get(&live))
            .await
            .unwrap()
            .0,
        200
    );

    // A real deploy of the same model replaces the broken version; the replica loads it and
    // becomes ready.
    let r = deploy_job(&s, "http", "digits-h", "").await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    assert_eq!(r.steps[1].metrics["version"], 2.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let b = ready.clone();
        let (code, body) = tokio::task::spawn_blocking(move || http_get(&b))
            .await
            .unwrap();
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let meta = format!("{base}/v2/models/digits-h");
    let (code, body) = tokio::task::spawn_blocking(move || http_get(&meta))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let meta: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(meta["inputs"][0]["shape"], serde_json::json!([-1, 64]));
    assert_eq!(meta["versions"], serde_json::json!(["2"]));

    let (_, flat) = test_rows(3);
    let bytes = s
        .res
        .artifacts
        .get(r.steps[0].artifact.as_ref().unwrap())
        .await
        .unwrap();
    let engine = Engine::from_artifact(&Artifact::from_bytes(&bytes).unwrap()).unwrap();
    let want: Vec<usize> = engine
        .predict_batch(&flat, 3)
        .unwrap()
        .iter()
        .map(|p| p.class)
        .collect();
    let infer = format!("{base}/v2/models/digits-h/infer");
    let body = serde_json::json!({"inputs": [{"name": "input-0", "shape": [3, 64], "datatype": "FP32", "data": flat}]});
    let (code, text) = tokio::task::spawn_blocking(move || {
        match ureq::post(&infer)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
        {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => (0, e.to_string()),
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["outputs"][0]["data"], serde_json::json!(want));
    // A wrong-shape request over HTTP is a 400 naming the problem.
    let infer = format!("{base}/v2/models/digits-h/infer");
    let (code, text) = tokio::task::spawn_blocking(move || {
        match ureq::post(&infer).send_string(
            r#"{"inputs":[{"name":"i","shape":[1,3],"datatype":"FP32","data":[1,2,3]}]}"#,
        ) {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
            Err(e) => (0, e.to_string()),
        }
    })
    .await
    .unwrap();
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("expected 64 features, got 3"), "{text}");
    let _ = child.kill();
    let _ = child.wait();
    trainer.stop().await;
}

/// The OIP JSON request of the first `n` digits test rows (integers, so compact).
fn oip_request(n: usize) -> Vec<u8> {
    let (_, flat) = test_rows(n);
    let data: Vec<i64> = flat.iter().map(|&x| x as i64).collect();
    serde_json::json!({"inputs": [{"name": "x", "shape": [n, 64], "datatype": "FP32", "data": data}]})
        .to_string()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_telemetry_respect_the_servers_max_payload() {
    // A server whose max_payload (16 KiB) is below a 512-record telemetry batch with sampled
    // inputs and below the reply to a request that itself fits.
    const MAX_PAYLOAD: usize = 16 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let config = lathe_testkit::write_file(
        dir.path(),
        "small.conf",
        &format!("max_payload: {MAX_PAYLOAD}\n"),
    );
    let server = lathe_testkit::NatsServer::start_with(Vec::new(), Some(config));
    let url = server.url();
    let res = connect(&url, "client").await;
    assert_eq!(res.client.server_info().max_payload, MAX_PAYLOAD);
    let trainer = start_trainer(&url, "t1").await;
    let settings = lathe_deployer::ServeSettings {
        telemetry_sample: 1.0,
        telemetry_flush: Duration::from_millis(500),
        ..serve_settings("d1")
    };
    let deployer = start_deployer(&url, "d1", settings).await;
    let job = submit(&res, &deploy_spec("small", "digits-s", "")).await;
    let r = wait_job(&res, job, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);

    // Telemetry: 600 single rows, every input sampled, come out in batches that fit.
    let mut telemetry = res
        .client
        .subscribe("lathe.telemetry.digits-s")
        .await
        .unwrap();
    let one = serde_json::json!({"inputs": test_rows(1).0[0]});
    for _ in 0..600 {
        ask_json(&res.client, "digits-s", one.clone()).await;
    }
    let (mut records, mut batches) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while records < 600 && Instant::now() < deadline {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), telemetry.next()).await {
            assert!(m.payload.len() <= MAX_PAYLOAD);
            let b: lathe_proto::TelemetryBatch = codec::from_msgpack(&m.payload).unwrap();
            assert!(
                b.records
                    .iter()
                    .all(|r| r.sampled_inputs.iter().all(|i| i.len() == 64))
            );
            records += b.records.len();
            batches += 1;
        }
    }
    assert_eq!(
        records, 600,
        "telemetry records delivered ({batches} batches)"
    );
    assert!(batches > 1, "the records were split into batches that fit");

    // Replies: measure an OIP reply's bytes per row on a small batch, then send the
    // largest batch whose request fits: its reply does not, and it gets a 413 naming the
    // limit instead of a timeout.
    let small = ask(&res.client, "digits-s", oip_request(8), "application/json")
        .await
        .expect("a small batch is answered");
    let reply_per_row = small.payload.len() as f64 / 8.0;
    let n = (1..1024)
        .take_while(|&n| oip_request(n).len() < MAX_PAYLOAD - 512)
        .last()
        .unwrap();
    assert!(
        reply_per_row * n as f64 > 1.1 * MAX_PAYLOAD as f64,
        "test premise: {n} rows reply about {} B",
        reply_per_row * n as f64
    );
    let (code, message) = ask(&res.client, "digits-s", oip_request(n), "application/json")
        .await
        .expect_err("the reply is too large");
    assert_eq!(code, "413", "{message}");
    assert!(message.contains("send fewer rows"), "{message}");
    assert!(message.contains(&MAX_PAYLOAD.to_string()), "{message}");
    // The replica keeps serving.
    ask(&res.client, "digits-s", oip_request(8), "application/json")
        .await
        .expect("served after the refusal");
    deployer.stop().await;
    trainer.stop().await;
}
