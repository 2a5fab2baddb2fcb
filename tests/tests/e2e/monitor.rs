//! The monitor through real NATS with real deployed models: a job ends `completed` only after
//! its smoke test passed through the live endpoint (and fails when no replica answers);
//! traffic from the test split raises no alert; shifted features raise a drift alert naming
//! them; a slow or wrong canary is rolled back while the active version keeps serving; a
//! healthy canary is promoted after its window; feedback labels give the expected accuracy.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lathe_model::artifact::Artifact;
use lathe_model::engine::Engine;
use lathe_proto::health::ModelHealth;
use lathe_proto::{Alert, AlertKind, InferReply, JobState, ModelName, Stage, codec};
use lathe_tests::*;
use tokio_util::sync::CancellationToken;

fn monitor_settings(id: &str) -> lathe_monitor::MonitorSettings {
    lathe_monitor::MonitorSettings {
        tick: Duration::from_millis(250),
        smoke_timeout: Duration::from_secs(5),
        replica: id.to_string(),
    }
}

async fn start_monitor(url: &str, id: &str) -> InProcess {
    let res = connect(url, id).await;
    let stop = CancellationToken::new();
    let s = stop.clone();
    let settings = monitor_settings(id);
    let handle = tokio::spawn(async move {
        lathe_monitor::run(res, settings, s)
            .await
            .expect("the monitor runs");
    });
    InProcess { stop, handle }
}

/// A `train → deploy → monitor` spec; `hidden`/`epochs` shape the model, `deploy` and
/// `monitor` are the sections' bodies after the model name.
fn spec(
    name: &str,
    model: &str,
    hidden: &str,
    epochs: u32,
    deploy: &str,
    monitor: &str,
) -> Vec<u8> {
    format!(
        r#"{{"name": "{name}", "dataset": {{"source": "builtin:digits"}}, "model": {{"hidden": {hidden}}},
            "train": {{"epochs": {epochs}, "patience": null, "seed": 1}},
            "pipeline": ["train", "deploy", "monitor"],
            "deploy": {{"model": "{model}"{deploy}}}, "monitor": {{"smoke_rows": 20{monitor}}}}}"#
    )
    .into_bytes()
}

fn test_split() -> lathe_model::Dataset {
    lathe_model::data::builtin("digits").unwrap().1
}

async fn infer(
    client: &async_nats::Client,
    model: &str,
    id: Option<String>,
    row: &[f32],
) -> InferReply {
    let body = serde_json::json!({ "id": id, "inputs": row });
    let msg = client
        .request(format!("lathe.infer.{model}"), body.to_string().into())
        .await
        .expect("a reply");
    assert!(
        msg.headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error"))
            .is_none(),
        "{:?}",
        msg.headers
    );
    serde_json::from_slice(&msg.payload).expect("an InferReply")
}

/// Alerts about `model` from the `LATHE_ALERTS` stream, as a subscriber sees them.
async fn alerts(client: &async_nats::Client, model: &str) -> async_nats::Subscriber {
    client
        .subscribe(format!("lathe.alerts.{model}"))
        .await
        .unwrap()
}

fn drain(sub: &mut async_nats::Subscriber) -> Vec<Alert> {
    let mut out = Vec::new();
    while let Some(Some(m)) = sub.next().now_or_never() {
        out.push(serde_json::from_slice(&m.payload).expect("an alert"));
    }
    out
}

use futures::FutureExt;

async fn health(s: &Stack, model: &str) -> Option<ModelHealth> {
    s.res
        .health
        .get(model)
        .await
        .unwrap()
        .map(|b| codec::from_msgpack(&b).unwrap())
}

async fn wait_for<F: Fn(&lathe_proto::registry::ModelEntry) -> bool>(
    s: &Stack,
    model: &str,
    what: &str,
    timeout: Duration,
    f: F,
) {
    let m: ModelName = model.parse().unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((e, _)) = s.res.registry.get(&m).await.unwrap()
            && f(&e)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_completes_only_after_its_smoke_test_and_steady_traffic_raises_nothing() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let deployer = start_deployer(&url, "d1", serve_settings("d1")).await;
    let monitor = start_monitor(&url, "m1").await;
    let mut alerts_sub = alerts(&s.res.client, "digits-s").await;
    let job = submit(
        &s.res,
        &spec(
            "smoke",
            "digits-s",
            "[32]",
            15,
            "",
            r#", "window_secs": 5, "p99_latency_ms": 200, "max_error_rate": 0.01"#,
        ),
    )
    .await;
    let r = wait_job(&s.res, job, Duration::from_secs(120)).await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let m = &r.steps[2];
    assert_eq!(m.stage, Stage::Monitor);
    assert_eq!(m.metrics["smoke_rows"], 20.0);
    assert_eq!(m.metrics["smoke_agreement"], 1.0);
    assert!(m.metrics["baseline_p99_ms"] > 0.0);
    // The job's end comes after the smoke test, which came after the deploy.
    assert!(m.started_at_ms.unwrap() >= r.steps[1].finished_at_ms.unwrap());
    assert!(r.finished_at_ms.unwrap() >= m.finished_at_ms.unwrap());
    let summary = &m.details.as_ref().unwrap()["summary"];
    assert_eq!(summary.as_array().unwrap().len(), 2, "{summary}");
    let model: ModelName = "digits-s".parse().unwrap();
    let (entry, _) = s.res.registry.get(&model).await.unwrap().unwrap();
    assert_eq!(entry.policy.as_ref().unwrap().window_secs, 5);

    // 5 000 requests drawn from the test split: no alert.
    let test = test_split();
    let n = 5000;
    futures::stream::iter(0..n)
        .for_each_concurrent(16, |i| {
            let c = s.res.client.clone();
            let row = test.row(i % test.rows()).to_vec();
            async move {
                infer(&c, "digits-s", None, &row).await;
            }
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let h = health(&s, "digits-s").await.expect("health written");
    let v = &h.versions[0];
    assert_eq!(v.role, "active");
    assert!(v.requests >= 1000, "{v:?}");
    assert!(v.drifted.is_empty(), "{:?}", v.drifted);
    let mut got = drain(&mut alerts_sub);
    got.extend(stored_alerts(&s.res, "digits-s").await);
    assert!(got.is_empty(), "{got:?}");
    monitor.stop().await;
    deployer.stop().await;
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smoke_test_fails_the_job_when_no_replica_serves_the_version() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let deployer = start_deployer(&url, "d1", serve_settings("d1")).await;
    let job = submit(&s.res, &spec("nosmoke", "digits-n", "[32]", 10, "", "")).await;
    // Stop the only replica once the deploy step finished; only then does a monitor start.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = s.res.jobs.get(job).await.unwrap().is_some_and(|(r, _)| {
            r.steps
                .get(1)
                .is_some_and(|st| st.state == lathe_proto::StepState::Completed)
        });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deploy step did not complete"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    deployer.stop().await;
    let monitor = start_monitor(&url, "m1").await;
    let r = wait_job(&s.res, job, Duration::from_secs(60)).await;
    assert_eq!(r.state, JobState::Failed);
    let err = r.error.unwrap();
    assert!(
        err.contains("smoke test") && err.contains("did not answer"),
        "{err}"
    );
    monitor.stop().await;
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shifted_features_raise_a_drift_alert_naming_them() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let deployer = start_deployer(&url, "d1", serve_settings("d1")).await;
    let monitor = start_monitor(&url, "m1").await;
    let r = wait_job(
        &s.res,
        submit(
            &s.res,
            &spec(
                "drift",
                "digits-d",
                "[32]",
                10,
                "",
                r#", "window_secs": 4, "retrain_on_drift": true"#,
            ),
        )
        .await,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(r.state, JobState::Completed, "{:?}", r.error);
    let mut alerts_sub = alerts(&s.res.client, "digits-d").await;
    // Pixels 20, 21 and 22 (features "f20".. in the digits data) get brighter by 8 levels.
    let test = test_split();
    let shifted = [20usize, 21, 22];
    for i in 0..400 {
        let mut row = test.row(i % test.rows()).to_vec();
        for &f in &shifted {
            row[f] = (row[f] + 8.0).min(16.0);
        }
        infer(&s.res.client, "digits-d", None, &row).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let alert = loop {
        let got = drain(&mut alerts_sub);
        if let Some(a) = got.into_iter().find(|a| a.kind == AlertKind::FeatureDrift) {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "no drift alert within the window"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let names = &test.feature_names;
    let shifted_names: Vec<&String> = shifted.iter().map(|&f| &names[f]).collect();
    // The alert goes out at the first evaluation that finds drift, which may come before
    // every shifted row arrived (a small sample is judged by the KS test): it names at least
    // one shifted feature, and the window's health, once it holds the whole burst, names
    // all three.
    assert!(
        alert.features.iter().any(|f| shifted_names.contains(&f)),
        "{:?} names none of {shifted_names:?}",
        alert.features
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let drifted: Vec<String> = health(&s, "digits-d")
            .await
            .and_then(|h| h.versions.into_iter().find(|v| v.role == "active"))
            .map(|v| v.drifted.into_iter().map(|d| d.feature).collect())
            .unwrap_or_default();
        if shifted_names.iter().all(|n| drifted.contains(n)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the window's health names {drifted:?}, not all of {shifted_names:?}"
        );
        // The shifted traffic goes on, so the window never empties meanwhile.
        for i in 0..20 {
            let mut row = test.row(i).to_vec();
            for &f in &shifted {
                row[f] = (row[f] + 8.0).min(16.0);
            }
            infer(&s.res.client, "digits-d", None, &row).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        alert.features.len() <= 8,
        "too many features named: {:?}",
        alert.features
    );
    assert!(alert.figure > alert.threshold);
    // The alert is also an event of the deploying job.
    let events = events_of(&s.res, r.job_id).await;
    assert!(
        events
            .iter()
            .any(|e| e.kind == lathe_proto::EventKind::Alert && e.message.contains("drifted"))
    );
    // The drift goes on (retrain_on_drift): once it has lasted a whole window, the job that
    // trained the version is submitted again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        let jobs = s.res.jobs.list().await.unwrap();
        if jobs
            .iter()
            .any(|j| j.name == "drift" && j.job_id != r.job_id)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no retraining job after persistent drift"
        );
        for _ in 0..20 {
            let mut row = test.row(i % test.rows()).to_vec();
            for &f in &shifted {
                row[f] = (row[f] + 8.0).min(16.0);
            }
            infer(&s.res.client, "digits-d", None, &row).await;
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = stored_alerts(&s.res, "digits-d").await;
    assert!(
        stored
            .iter()
            .any(|a| a.message.contains("retraining as job")),
        "{stored:?}"
    );
    monitor.stop().await;
    deployer.stop().await;
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_canary_is_rolled_back_and_a_healthy_one_promoted() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    // Version 2 answers slowly on this replica (the test-only delay knob).
    let slow = lathe_deployer::ServeSettings {
        test_delay: Some((2, Duration::from_millis(60))),
        ..serve_settings("d1")
    };
    let deployer = start_deployer(&url, "d1", slow).await;
    let monitor = start_monitor(&url, "m1").await;
    let policy = r#", "window_secs": 5, "p99_latency_ms": 25, "canary_window_secs": 3"#;
    let v1 = wait_job(
        &s.res,
        submit(&s.res, &spec("c1", "digits-k", "[32]", 10, "", policy)).await,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(v1.state, JobState::Completed, "{:?}", v1.error);
    let canary = r#", "strategy": "canary", "canary_percent": 30"#;
    let v2 = wait_job(
        &s.res,
        submit(&s.res, &spec("c2", "digits-k", "[32]", 10, canary, policy)).await,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(v2.state, JobState::Completed, "{:?}", v2.error);
    let test = test_split();
    let client = s.res.client.clone();
    let traffic = tokio::spawn(async move {
        let mut versions = Vec::new();
        for i in 0..400 {
            versions.push(
                infer(&client, "digits-k", None, test.row(i % test.rows()))
                    .await
                    .version,
            );
        }
        versions
    });
    wait_for(
        &s,
        "digits-k",
        "the slow canary's rollback",
        Duration::from_secs(20),
        |e| e.canary.is_none() && e.active == Some(1),
    )
    .await;
    let versions = traffic.await.unwrap();
    assert!(versions.contains(&1));
    // The active version keeps serving.
    for i in 0..50 {
        assert_eq!(
            infer(&s.res.client, "digits-k", None, test_split().row(i))
                .await
                .version,
            1
        );
    }
    let got = stored_alerts(&s.res, "digits-k").await;
    assert!(
        got.iter()
            .any(|a| a.kind == AlertKind::Latency && a.version == 2),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|a| a.kind == AlertKind::Rollback && a.version == 2),
        "{got:?}"
    );

    // A third version, healthy, as a canary: promoted once it stayed healthy for 3 s.
    let v3 = wait_job(
        &s.res,
        submit(&s.res, &spec("c3", "digits-k", "[32]", 12, canary, policy)).await,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(v3.state, JobState::Completed, "{:?}", v3.error);
    let client = s.res.client.clone();
    let stop_traffic = CancellationToken::new();
    let st = stop_traffic.clone();
    let traffic = tokio::spawn(async move {
        let test = test_split();
        let mut i = 0;
        while !st.is_cancelled() {
            infer(&client, "digits-k", None, test.row(i % test.rows())).await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    wait_for(
        &s,
        "digits-k",
        "the healthy canary's promotion",
        Duration::from_secs(30),
        |e| e.active == Some(3) && e.canary.is_none(),
    )
    .await;
    stop_traffic.cancel();
    traffic.await.unwrap();
    let got = stored_alerts(&s.res, "digits-k").await;
    assert!(
        got.iter()
            .any(|a| a.kind == AlertKind::Promotion && a.version == 3),
        "{got:?}"
    );
    monitor.stop().await;
    deployer.stop().await;
    trainer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_gives_the_accuracy_and_a_wrong_canary_is_rolled_back() {
    let s = stack().await;
    let url = s.server.url();
    let trainer = start_trainer(&url, "t1").await;
    let deployer = start_deployer(&url, "d1", serve_settings("d1")).await;
    let monitor = start_monitor(&url, "m1").await;
    let policy = r#", "window_secs": 30, "min_accuracy": 0.8, "canary_window_secs": 600"#;
    let v1 = wait_job(
        &s.res,
        submit(&s.res, &spec("f1", "digits-f", "[32]", 15, "", policy)).await,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(v1.state, JobState::Completed, "{:?}", v1.error);

    // Feedback on 200 requests: the monitor's accuracy is the engine's on those rows.
    let bytes = s
        .res
        .artifacts
        .get(v1.steps[0].artifact.as_ref().unwrap())
        .await
        .unwrap();
    let engine = Engine::from_artifact(&Artifact::from_bytes(&bytes).unwrap()).unwrap();
    let test = test_split();
    let mut right = 0;
    for i in 0..200 {
        let id = format!("req-{i}");
        let row = test.row(i);
        let reply = infer(&s.res.client, "digits-f", Some(id.clone()), row).await;
        assert_eq!(reply.version, 1);
        right += usize::from(engine.predict(row).unwrap().class == test.labels[i] as usize);
        let label = &test.class_labels[test.labels[i] as usize];
        let fb = serde_json::json!({"request_id": id, "labels": [label]});
        s.res
            .client
            .publish("lathe.feedback.digits-f", fb.to_string().into())
            .await
            .unwrap();
    }
    let expected = right as f64 / 200.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = health(&s, "digits-f").await;
        let v = h
            .as_ref()
            .and_then(|h| h.versions.iter().find(|v| v.version == 1).cloned());
        if let Some(v) = v
            && v.labelled_rows == 200
        {
            assert!(
                (v.accuracy.unwrap() - expected).abs() < 1e-9,
                "{:?} vs {expected}",
                v.accuracy
            );
            break;
        }
        assert!(Instant::now() < deadline, "feedback not counted: {h:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Malformed feedback is ignored; the monitor keeps going.
    s.res
        .client
        .publish("lathe.feedback.digits-f", "{not json".into())
        .await
        .unwrap();

    // A canary that answers wrongly (a 2-neuron model trained one epoch): feedback shows
    // its accuracy under the policy's 80 %, so it is rolled back.
    let canary = r#", "strategy": "canary", "canary_percent": 50"#;
    let v2 = wait_job(
        &s.res,
        submit(&s.res, &spec("f2", "digits-f", "[2]", 1, canary, policy)).await,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(v2.state, JobState::Completed, "{:?}", v2.error);
    assert!(
        v2.steps[1].metrics["test_accuracy"] < 0.8,
        "{:?}",
        v2.steps[1].metrics
    );
    for i in 0..300 {
        let id = format!("c-{i}");
        let row = test.row(i % test.rows());
        infer(&s.res.client, "digits-f", Some(id.clone()), row).await;
        let label = &test.class_labels[test.labels[i % test.rows()] as usize];
        let fb = serde_json::json!({"request_id": id, "labels": [label]});
        s.res
            .client
            .publish("lathe.feedback.digits-f", fb.to_string().into())
            .await
            .unwrap();
    }
    wait_for(
        &s,
        "digits-f",
        "the wrong canary's rollback",
        Duration::from_secs(20),
        |e| e.canary.is_none() && e.active == Some(1),
    )
    .await;
    let m: ModelName = "digits-f".parse().unwrap();
    let (entry, _) = s.res.registry.get(&m).await.unwrap().unwrap();
    let last = entry.history.last().unwrap();
    assert!(last.reason.contains("accuracy"), "{last:?}");
    assert_eq!(
        infer(&s.res.client, "digits-f", None, test.row(0))
            .await
            .version,
        1
    );
    monitor.stop().await;
    deployer.stop().await;
    trainer.stop().await;
}
